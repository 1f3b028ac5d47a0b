"""Helpers the tests share, by topic; tests import them from here, never from a conftest or
another test module (conftests hold fixtures only).

- :mod:`tests.helpers.cluster`: Ray environment, one local Ray, small job configs, datasets;
- :mod:`tests.helpers.s3`: a real S3 server (SeaweedFS) on 127.0.0.1;
- :mod:`tests.helpers.bombs`: decompression bombs and lying headers;
- :mod:`tests.helpers.serving`: the Serve tests' app handle, volumes, rows, fake backend;
- :mod:`tests.helpers.engines`: vLLM availability, engine-sized tiny models, engine parity;
- :mod:`tests.helpers.methods`: synthetic encoder output for the methods' token rules;
- :mod:`tests.helpers.slices`: synthetic volumes for the slice filters.
"""

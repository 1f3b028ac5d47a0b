"""Bytes in and out: object storage, volume formats (NIfTI, NPY, DICOM, NRRD, slice folders),
dataset and result writers."""

"""ROUGE-1 and ROUGE-L with the semantics of the ``rouge`` package 1.0.1 (pltrdy), rewritten.

The paper's evaluation scored with that package; these rules reproduce it exactly (the tests
compare against the package itself when it is installed) without depending on it at run time:

- a text is split into sentences on ``"."``; pieces of length 0 are dropped *before*
  whitespace is normalised, so a piece of blanks survives as an empty sentence ``""``;
- words are the sentence split on single spaces (an empty sentence yields the word ``""``);
- n-grams are counted as **sets** (unique), over the words of all sentences run together;
- ROUGE-L is summary-level: for each reference sentence and each hypothesis sentence the
  longest common subsequence is reconstructed (ties go to the left, see :func:`lcs_words`);
  the union of all LCS words, as a set, is the hit count; recall divides by the number of
  unique reference words, precision by the number of unique hypothesis words;
- F = 2PR / (P + R + 1e-8); an empty hypothesis or reference (no sentence) is an error,
  which the scorer turns into 0.

The package reconstructs the LCS recursively (deep recursion on long reports); this version
walks the same table iteratively with the same tie-break, so results are identical.
"""

from __future__ import annotations

EPS = 1e-8


class EmptyTextError(ValueError):
    """The hypothesis or the reference has no sentence (the package raises here too)."""


def sentences(text: str) -> list[str]:
    """Split like ``Rouge.get_scores``: on ``"."``, keep non-empty pieces, normalise spaces."""
    return [" ".join(piece.split()) for piece in text.split(".") if len(piece) > 0]


def words(sents: list[str]) -> list[str]:
    """All words of the sentences, split on single spaces."""
    return [w for s in sents for w in s.split(" ")]


def _f(p: float, r: float) -> float:
    return 2.0 * ((p * r) / (p + r + EPS))


def rouge_n(hyp_sents: list[str], ref_sents: list[str], n: int = 1) -> dict[str, float]:
    """ROUGE-N over unique n-grams; returns ``{"f", "p", "r"}``."""
    if not hyp_sents:
        raise EmptyTextError("Hypothesis is empty.")
    if not ref_sents:
        raise EmptyTextError("Reference is empty.")

    def grams(tokens: list[str]) -> set[tuple[str, ...]]:
        return {tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}

    hyp, ref = grams(words(hyp_sents)), grams(words(ref_sents))
    overlap = len(hyp & ref)
    p = overlap / len(hyp) if hyp else 0.0
    r = overlap / len(ref) if ref else 0.0
    return {"f": _f(p, r), "p": p, "r": r}


def lcs_words(x: list[str], y: list[str]) -> list[str]:
    """Words of one longest common subsequence of ``x`` and ``y`` (taken from ``x``).

    Walks back from the end: on equal words take both; otherwise step up in ``x`` only when
    that cell is strictly larger than the one to the left, else step left in ``y`` (the
    package's tie-break, which decides *which* words form the LCS).
    """
    n, m = len(x), len(y)
    table = [[0] * (m + 1) for _ in range(n + 1)]  # (n+1, m+1) LCS lengths of prefixes
    for i in range(1, n + 1):
        xi, row, prev = x[i - 1], table[i], table[i - 1]
        for j in range(1, m + 1):
            row[j] = prev[j - 1] + 1 if xi == y[j - 1] else max(prev[j], row[j - 1])
    out: list[str] = []
    i, j = n, m
    while i > 0 and j > 0:
        if x[i - 1] == y[j - 1]:
            out.append(x[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    out.reverse()
    return out


def rouge_l(hyp_sents: list[str], ref_sents: list[str]) -> dict[str, float]:
    """Summary-level ROUGE-L with union LCS over unique words; returns ``{"f", "p", "r"}``."""
    if not hyp_sents or not ref_sents:
        raise EmptyTextError("Collections must contain at least 1 sentence.")
    m = len(set(words(ref_sents)))
    n = len(set(words(hyp_sents)))
    union: set[str] = set()
    hyp_words = [s.split(" ") for s in hyp_sents]
    for ref in ref_sents:
        ref_words = ref.split(" ")
        for hyp in hyp_words:
            union.update(lcs_words(ref_words, hyp))
    r, p = len(union) / m, len(union) / n
    return {"f": _f(p, r), "p": p, "r": r}


def rouge_scores(hypothesis: str, reference: str) -> dict[str, float]:
    """``{"rouge1": F, "rougeL": F}`` for two raw strings (no lower-casing here).

    Raises:
        EmptyTextError: if either text has no sentence (e.g. ``""`` or ``"."``).
    """
    hyp, ref = sentences(hypothesis), sentences(reference)
    return {"rouge1": rouge_n(hyp, ref, 1)["f"], "rougeL": rouge_l(hyp, ref)["f"]}

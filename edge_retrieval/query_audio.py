"""Query by example: a recording's own vectors as the query, and a threshold it passes itself.

The vectors come from ``retrieval.example_payloads`` (the same construction archive search
uses). Scores of labels queries sit on the scale of the example's own probabilities, so a fixed
threshold can miss the example itself (a siren BirdNET hears weakly scores ~0.15 against itself);
the default threshold is instead ``EXAMPLE_ALPHA`` times the example's self-score, its best
window score under its own query. Needs only the device part of the bundle.
"""

from __future__ import annotations

from pathlib import Path

from .bundle import Bundle
from .protocol import SCHEMA, QueryMessage, utcnow
from .retrieval import FileEmbedder, example_payloads, example_query, self_score

# Default threshold = this fraction of the self-score: a re-recording of the same sound, cut at
# other window offsets, still passes; chosen on the dev half of the fixture (README, "Query by
# example"), where lower fractions mostly added fires on other categories.
EXAMPLE_ALPHA = 0.8
# Below this self-score the bundle hears little in the example: warn that it may fire on anything.
WEAK_SELF_SCORE = 0.1


def example_from_audio(
    bundle: Bundle, path: str | Path, query_id: str, threshold: float | None = None, threads: int = 1
) -> tuple[QueryMessage, float]:
    """(query message, self-score): the recording as a query; ``threshold`` None -> alpha x self-score."""
    fv = FileEmbedder(bundle, threads=threads).embed_file(path)
    payloads = example_payloads(fv, bundle.manifest)
    own = self_score(example_query(fv, bundle.manifest), fv)
    thr = EXAMPLE_ALPHA * own if threshold is None else threshold
    n_exp = len(payloads)
    msg = QueryMessage.model_validate(
        {
            "schema": SCHEMA,
            "query_id": query_id,
            "version": 1,
            "text": f"like {Path(path).name}"[:500],
            "space_id": bundle.manifest.space.id,
            "vectors": [p.model_dump(exclude_none=True) for p in payloads],
            "weights": [1.0 / n_exp] * n_exp,
            "threshold": float(thr),
            "created": utcnow(),
        }
    )
    return msg, own


def query_from_audio(
    bundle: Bundle, path: str | Path, query_id: str, threshold: float | None = None, threads: int = 1
) -> QueryMessage:
    """The query message of ``example_from_audio`` alone."""
    return example_from_audio(bundle, path, query_id, threshold, threads)[0]

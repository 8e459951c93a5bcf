"""Packing statistics: what went in, what came out, what was lost; printed and saved as JSON with every build.

Definitions (docs/data.md repeats them):

- ``stream_tokens``: every token laid into the stream, BOS/EOS included, over all passes (a document repeated by a
  weight or a pass counts each time);
- ``padding_tokens``: row slots filled with padding (``whole_docs`` only; 0 otherwise);
- ``kept_tokens`` = ``rows * seq_len - padding_tokens``; ``dropped_tokens`` = ``stream_tokens - kept_tokens`` (the
  partial tail; 0 with ``whole_docs``, which pads its last rows instead);
- ``efficiency`` = ``kept_tokens / (stream_tokens + padding_tokens)``: the tail (or the padding) is the only loss;
- documents removed by ``min_doc_tokens`` are a filter, not a packing loss: counted apart (``short_filtered``).
"""

from __future__ import annotations

import numpy as np


def length_histogram(lengths: np.ndarray) -> dict[str, int]:
    """Documents per power-of-two length bin of tokens: ``{"[1024, 2048)": 3, ...}``, empty bins left out."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size == 0:
        return {}
    exp = np.floor(np.log2(np.maximum(lengths, 1))).astype(int)
    return {f"[{2 ** e}, {2 ** (e + 1)})": int(n) for e, n in zip(*np.unique(exp, return_counts=True))}


def packing_stats(*, sources: list[dict], doc_lengths: np.ndarray, short_filtered: int, short_filtered_tokens: int,
                  stream_docs: int, stream_tokens: int, rows: int, seq_len: int, mode: str, passes: int,
                  specials_per_doc: int, padding_tokens: int = 0) -> dict:
    """The stats dict of one build. ``doc_lengths``: content tokens of each kept distinct document."""
    kept = rows * seq_len - padding_tokens
    return {
        "mode": mode,
        "seq_len": seq_len,
        "passes": passes,
        "sources": sources,
        "documents": int(len(doc_lengths)),
        "document_tokens": int(np.sum(doc_lengths, dtype=np.int64)),
        "short_filtered": short_filtered,
        "short_filtered_tokens": short_filtered_tokens,
        "stream_documents": stream_docs,
        "special_tokens": stream_docs * specials_per_doc,
        "stream_tokens": stream_tokens,
        "rows": rows,
        "kept_tokens": kept,
        "dropped_tokens": stream_tokens - kept,
        "padding_tokens": padding_tokens,
        "efficiency": kept / (stream_tokens + padding_tokens) if stream_tokens else 0.0,
        "doc_length_histogram": length_histogram(doc_lengths),
    }


def format_stats(stats: dict) -> str:
    """A short human-readable report of ``stats``."""
    lines = [f"packed {stats['rows']:,} rows x {stats['seq_len']:,} tokens, mode {stats['mode']}, "
             f"{stats['passes']} pass(es)"]
    for s in stats["sources"]:
        lines.append(f"  source {s['source']}: {s['documents_kept']:,} documents kept of {s['documents_read']:,} "
                     f"read; empty skipped {s['empty_skipped']:,}; invalid UTF-8 replaced "
                     f"{s['invalid_utf8_replaced']:,} (in {s['invalid_utf8_documents']:,} documents)"
                     + (f"; bad documents skipped {s['bad_skipped']:,}" if s.get("bad_skipped") else ""))
        lines += [f"    skipped: {reason}" for reason in s.get("bad_examples", [])]
    lines += [
        f"  documents {stats['documents']:,} ({stats['document_tokens']:,} tokens); shorter than min_doc_tokens: "
        f"{stats['short_filtered']:,} ({stats['short_filtered_tokens']:,} tokens)",
        f"  stream {stats['stream_tokens']:,} tokens ({stats['stream_documents']:,} documents, "
        f"{stats['special_tokens']:,} of them BOS/EOS)",
        f"  kept {stats['kept_tokens']:,}, dropped tail {stats['dropped_tokens']:,}, padding "
        f"{stats['padding_tokens']:,}; efficiency {100 * stats['efficiency']:.3f}%",
        "  document lengths (tokens): " + ", ".join(f"{k} {v}" for k, v in stats["doc_length_histogram"].items()),
    ]
    return "\n".join(lines)

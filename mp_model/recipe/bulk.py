"""Bulk labelling on Ray Data: ``predict_dataset`` labels a ``ray.data.Dataset`` with a pool of actors, each loading
the model once, and ``RayLabeller`` is ``mp predict --engine ray``'s labeller (``mp_model.recipe.stream``).

Ray is optional (``pip install magic-pyramid[ray]``); ``require_ray`` says how to install it. Each actor labels
its blocks with ``mp_model.recipe.predict.predict`` (texts sorted by length, batched by a token budget), so its
labels and exit layers are those of the in-process engine (confidences agree to float32 rounding, about 1e-6).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mp_model.recipe.files import InputText
from mp_model.recipe.predict import LABEL_FIELDS, blank_row, predict
from mp_model.recipe.stream import BATCH_TOKENS, WINDOW, bound_native_caches, release_free_memory

INSTALL_HINT = "the Ray engine needs Ray Data: pip install 'magic-pyramid[ray]' (or pip install 'ray[data]')"


def require_ray() -> Any:
    """The ``ray`` module with ``ray.data``; a ``ValueError`` saying how to install it if it is missing."""
    try:
        import ray
        import ray.data  # noqa: F401 - the data library is a separate extra
    except ImportError as error:
        raise ValueError(INSTALL_HINT) from error
    return ray


class _Labeller:
    """The callable class of ``map_batches``: loads the model and tokenizer once per actor, labels pyarrow blocks."""

    def __init__(
        self,
        model_dir: str,
        knobs: dict[str, Any],
        columns: dict[str, str | None],
        threads: int,
        expect: dict[str, str] | None = None,
    ) -> None:
        import torch

        from mp_model.recipe.runs import load_checked_with_tokenizer

        bound_native_caches()
        if threads:
            torch.set_num_threads(threads)
        self.device = "cuda" if knobs.pop("gpus", 0) and torch.cuda.is_available() else "cpu"
        self.model, self.tokenizer, identity = load_checked_with_tokenizer(model_dir, self.device)
        for key, value in (expect or {}).items():
            if identity[key] != value:
                raise ValueError(f"{model_dir} changed since the job started ({key} differs): run it again")
        self.model.eval()
        self.knobs, self.columns = knobs, columns

    def __call__(self, block: Any) -> Any:
        import pyarrow as pa

        names = self.columns
        for column in (names["id"], names["text"], names["pair"]):
            if column is not None and column not in block.column_names:
                raise ValueError(f"the dataset has no column {column!r}; its columns are {block.column_names}")
        ids = block.column(names["id"]).to_pylist()
        segments = [block.column(names["text"]).to_pylist()]
        segments.append(block.column(names["pair"]).to_pylist() if names["pair"] else [None] * len(ids))
        texts = []
        for position, (text, pair) in enumerate(zip(*segments, strict=True)):
            for name, value in ((names["text"], text), (names["pair"], pair)):
                if value is not None and not isinstance(value, str) or (name == names["text"] and value is None):
                    raise ValueError(f"id {ids[position]!r}: {name!r} must be a string, got {value!r}")
            text = text if text.strip() else ""
            pair = pair if text and pair and pair.strip() else None
            texts.append(InputText(position, None, text, pair))
        rows = predict(self.model, self.tokenizer, texts, device=self.device, **self.knobs)
        release_free_memory()
        types = {"label": pa.string(), "label_id": pa.int64(), "confidence": pa.float64()}
        types |= {"exit_layer": pa.int64(), "gflops": pa.float64()}
        columns = {"id": ids} | {field: pa.array([row[field] for row in rows], types[field]) for field in LABEL_FIELDS}
        return pa.table(columns)


def predict_dataset(
    ds: Any,
    model_dir: str | Path,
    *,
    tau: float | None = None,
    threshold_scale: float = 1.0,
    batch_tokens: int = BATCH_TOKENS,
    text_column: str = "text",
    pair_column: str | None = None,
    id_column: str = "id",
    max_length: int | None = None,
    prune: bool = True,
    early_exit: bool = True,
    workers: int = 1,
    gpus_per_worker: float = 0,
    cpus_per_worker: float = 1,
    block_size: int = WINDOW,
    expect: dict[str, str] | None = None,
) -> Any:
    """``ds`` (a ``ray.data.Dataset`` with an id and a text column) labelled by the model saved in ``model_dir``.

    Returns a lazy ``ray.data.Dataset`` of one row per input row: ``id`` (from ``id_column``) and the label fields
    of the in-process rows (``label``, ``label_id``, ``confidence``, ``exit_layer``, ``gflops``; ``None`` for an
    empty text), in no particular order; write it with ``write_json``/``write_parquet`` or iterate it. Built on
    ``ds.map_batches`` with a pool of ``workers`` actors (``ActorPoolStrategy``), each holding the model once and
    reserving ``cpus_per_worker`` CPUs (its torch threads) and ``gpus_per_worker`` GPUs (then it runs on CUDA);
    each labels ``block_size`` rows at a time, in batches of at most ``batch_tokens`` padded tokens. A text must be
    a string (and a pair, from ``pair_column``, a string or null). Knobs as ``mp_model.recipe.predict.predict``
    (``tau`` ``None``: the model's ``exit_tau``). ``expect`` (``config_sha256``, ``weights_sha256``,
    ``tokenizer_sha256``: the identity ``mp_model.recipe.runs.load_checked`` gave the caller) makes each actor refuse
    a model that has changed since.
    """
    ray = require_ray()
    knobs = {"tau": tau, "threshold_scale": threshold_scale, "batch_tokens": batch_tokens, "max_length": max_length}
    knobs |= {"prune": prune, "early_exit": early_exit, "batch_size": batch_tokens, "gpus": gpus_per_worker}
    columns = {"id": id_column, "text": text_column, "pair": pair_column}
    return ds.map_batches(
        _Labeller,
        batch_size=block_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=cpus_per_worker,
        num_gpus=gpus_per_worker,
        fn_constructor_kwargs={
            "model_dir": str(Path(model_dir).resolve()),
            "knobs": knobs,
            "columns": columns,
            "threads": max(1, int(cpus_per_worker)),
            "expect": expect,
        },
    )


class RayLabeller:
    """``mp predict --engine ray``'s labeller: each chunk of texts the stream gives it becomes a Ray dataset of
    blocks of ``block_size`` records, labelled by ``predict_dataset``; the rows come back in input order and equal
    the in-process engine's. ``ray.init()`` is called if Ray is not running (``RAY_ADDRESS`` selects a cluster)."""

    def __init__(self, model_dir: str | Path, *, pairs: bool, block_size: int = WINDOW, **options: Any) -> None:
        self.ray = require_ray()
        if not self.ray.is_initialized():
            self.ray.init(include_dashboard=False, log_to_driver=False)
        self.model_dir, self.pairs, self.block_size, self.options = model_dir, pairs, block_size, options

    def __call__(self, texts: list[InputText], stats: dict[str, float]) -> list[dict[str, Any]]:
        import pyarrow as pa

        blocks = [
            pa.table(
                {
                    "id": [text.index for text in part],
                    "text": [text.text for text in part],
                    "text_pair": pa.array([text.text_pair for text in part], pa.string()),
                }
            )
            for part in (texts[start : start + self.block_size] for start in range(0, len(texts), self.block_size))
        ]
        ds = self.ray.data.from_arrow(blocks)
        labelled = predict_dataset(
            ds, self.model_dir, pair_column="text_pair", block_size=self.block_size, **self.options
        )
        first = texts[0].index
        rows = [blank_row(text, self.pairs) for text in texts]
        for block in labelled.iter_batches(batch_size=None, batch_format="pyarrow"):
            for values in block.to_pylist():
                rows[values.pop("id") - first] |= values
        return rows

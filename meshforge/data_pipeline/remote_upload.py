"""``meshforge data prepare --output s3://bucket/prefix``: prepare locally, upload as shards finish, manifest last.

The shards are written into a staging dir, ``<cache_dir>/upload/<sha256(url)[:16]>/`` (the
ordinary prepared-dir layout, :mod:`.layout`); a background thread watches its slice
done-markers and uploads each finished slice's ``.idx`` and ``.bin`` while the next slices
are tokenized. Once every slice is done and merged, the tokenizer and then ``manifest.json``
go up, last, so a prefix without a manifest is never mistaken for a data set.

A re-run with the same inputs resumes: finished slices are not tokenized again (the
staging dir keeps their markers) and objects already in the store with the right size are
not uploaded again. The staging dir is removed once the manifest is up.

Several nodes (``--num-nodes``/``--node-rank``, or the launcher's environment): each prepares
and uploads its own slices, then their done-markers to ``<url>/.prepare/slice_*.json`` (each
after its shards); node 0 alone writes the manifest, once every slice's marker is up and every
shard object it names has its recorded size. A node that fails is re-run alone (its finished
slices are skipped); node 0, re-run, writes the manifest once they are all up.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path
from typing import Callable

from meshforge.data_pipeline.errors import DataError
from meshforge.data_pipeline.layout import MANIFEST, PLAN_FILE, WORK_DIR, atomic_write_json, marker_path, read_json
from meshforge.data_pipeline.manifest import manifest_of
from meshforge.data_pipeline.remote import RemoteStore
from meshforge.data_pipeline.remote_cache import cache_path
from meshforge.tokenizers import TOKENIZER_FILES, load_tokenizer


class _Uploader:
    """Uploads the shards of finished slices of ``staging`` to ``store``, each object once."""

    def __init__(self, store: RemoteStore, staging: Path, replace: bool = False):
        self.store, self.staging = store, staging
        self.replace = replace
        """An old data set's manifest is removed before the first upload (not before: bad input keeps it)."""
        self.done: set[str] = set()
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="meshforge-upload", daemon=True)

    def sweep(self) -> None:
        """Upload every shard of every done-marker that is not up yet (``.idx`` after its ``.bin``)."""
        for marker in sorted((self.staging / WORK_DIR).glob("slice_*.json")):
            m = read_json(marker)
            for s in (m or {}).get("shards", []):
                for ext in ("bin", "idx"):
                    self._put(f"{s['prefix']}.{ext}", s[f"{ext}_bytes"])

    def _put(self, name: str, size: int) -> None:
        if name in self.done:
            return
        local = self.staging / name
        if not local.is_file() or local.stat().st_size != size:
            return  # a marker of another plan, or a shard being replaced: the final sweep decides
        if self.replace:  # from here on the prefix is not a data set until the new manifest is up
            if self.store.exists(MANIFEST):
                self.store.fs.rm_file(self.store._path(MANIFEST))
            self.replace = False
        if not (self.store.exists(name) and self.store.info(name)["size"] == size):
            self.store.put_file(local, name)
        self.done.add(name)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            try:
                self.sweep()
            except BaseException as exc:  # noqa: BLE001 -- reported by finish()
                self.error = exc
                return

    def start(self) -> "_Uploader":
        self._thread.start()
        return self

    def finish(self) -> None:
        self._stop.set()
        self._thread.join()
        if self.error is not None:
            raise self.error
        self.sweep()


NODE_WAIT_SECONDS = 24 * 3600.0
"""How long node 0 of a multi-node upload waits for the other nodes' slices before it gives up."""


def prepare_to_url(
    url: str,
    cache_dir: Path,
    prepare: Callable[..., dict],
    overwrite: bool = False,
    num_nodes: int = 1,
    node_rank: int = 0,
    wait_seconds: float = NODE_WAIT_SECONDS,
    **kwargs,
) -> dict:
    """Run ``prepare(output_dir=staging, **kwargs)`` (``prepare_data``) and upload its result to ``url``.

    On ``num_nodes`` > 1 nodes, node ``r`` prepares and uploads its own slices (``prepare_data``'s
    split), then each slice's done-marker to ``<url>/.prepare/`` (after its shards); node 0 then
    waits (up to ``wait_seconds``) until every slice's marker of this plan is up, checks every
    shard object's size, and writes the tokenizer and the manifest, last: the only writer of
    ``manifest.json``. Returns the manifest (node 0 or one node) or this node's partial manifest."""
    store = RemoteStore(url)
    if num_nodes < 1 or not 0 <= node_rank < num_nodes:
        raise DataError(f"node_rank {node_rank} is not a rank of num_nodes {num_nodes}")
    if store.exists(MANIFEST) and not overwrite:
        raise DataError(
            f"{store.url_of(MANIFEST)} exists: that prefix holds a data set; pass --overwrite to replace it "
            "or choose another prefix"
        )
    staging = Path(cache_dir) / "upload" / cache_path(store.url, Path(cache_dir)).name
    if num_nodes > 1:  # nodes may share a cache dir (a shared filesystem)
        staging = staging.with_name(f"{staging.name}.node{node_rank}-of-{num_nodes}")
    try:
        staging.mkdir(parents=True, exist_ok=True)
        (staging / MANIFEST).unlink(missing_ok=True)  # merged again from the kept markers (a re-run resumes)
    except OSError as exc:
        raise DataError(
            f"the staging dir {staging} cannot be written ({exc.strerror}): set data.cache_dir / "
            "$MESHFORGE_CACHE to a writable dir with room for the shards"
        ) from None
    uploader = _Uploader(store, staging, replace=overwrite).start()
    try:
        result = prepare(
            output_dir=str(staging),
            overwrite=overwrite,
            num_nodes=num_nodes,
            node_rank=node_rank,
            merge=num_nodes == 1,
            **kwargs,
        )
    finally:
        uploader._stop.set()
    uploader.finish()
    if num_nodes > 1:
        _put_markers(store, staging, result["slices"], uploader.done)
        if node_rank != 0:
            shutil.rmtree(staging, ignore_errors=True)
            return result
        result = _remote_manifest(store, staging, wait_seconds)
        atomic_write_json(staging / MANIFEST, result)
    for name in TOKENIZER_FILES:  # a sentencepiece .model, or tokenizer.json + its config
        if (staging / name).is_file():
            store.put_file(staging / name, name)
    store.put_file(staging / MANIFEST, MANIFEST)
    shutil.rmtree(staging, ignore_errors=True)
    return result


def _put_markers(store: RemoteStore, staging: Path, slices: list[int], uploaded: set[str]) -> None:
    """This node's slice done-markers, each after every shard it names is up."""
    for i in slices:
        marker = read_json(marker_path(staging, i))
        names = [f"{s['prefix']}.{ext}" for s in marker["shards"] for ext in ("bin", "idx")]
        if any(n not in uploaded for n in names):
            raise DataError(
                f"slice {i}'s shards in {staging} do not match its marker: remove {staging} and re-run this node"
            )
        store.put_file(marker_path(staging, i), f"{WORK_DIR}/{marker_path(staging, i).name}")


def _remote_manifest(store: RemoteStore, staging: Path, wait_seconds: float, poll: float = 2.0) -> dict:
    """Node 0: the manifest from every slice's marker in the store (waiting for the other nodes'),
    once each shard object it names is there with its recorded size."""
    plan = read_json(staging / WORK_DIR / PLAN_FILE)
    n = len(plan["slices"])
    markers: list = [None] * n
    deadline = time.monotonic() + wait_seconds
    while True:
        for i in [i for i, m in enumerate(markers) if m is None]:
            name = f"{WORK_DIR}/{marker_path(staging, i).name}"
            if store.exists(name) and (m := json.loads(store.cat(name))).get("plan") == plan["hash"]:
                markers[i] = m
        missing = [i for i, m in enumerate(markers) if m is None]
        if not missing:
            break
        if time.monotonic() + poll > deadline:
            nodes = read_json(next((staging / WORK_DIR).glob("node_*.json")))["num_nodes"]
            raise DataError(
                f"{len(missing)} of {n} slices for {store.url} are not up after {wait_seconds:g} s (e.g. "
                f"{missing[:8]}, of node ranks {sorted({i % nodes for i in missing})[:16]}): run those nodes "
                "(finished slices are skipped), then node 0 again to write the manifest"
            )
        time.sleep(poll)
    shards = [s for m in markers for s in m["shards"]]
    names = [f"{s['prefix']}.{ext}" for s in shards for ext in ("bin", "idx")]
    sizes = [s[f"{ext}_bytes"] for s in shards for ext in ("bin", "idx")]
    for name, size, info in zip(names, sizes, store.infos(names)):
        if info["size"] != size:
            raise DataError(
                f"{store.url_of(name)} has {info['size']} bytes, its slice's marker says {size}: "
                "re-run the node that wrote it"
            )
    if not sum(m["documents"] for m in markers):
        raise DataError(
            f"inputs {[s['path'] for s in plan['slices']]} hold no documents: check the files and "
            f"text_field={plan['text_field']!r}"
        )
    return manifest_of(plan, markers, load_tokenizer(staging), staging)

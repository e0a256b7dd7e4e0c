"""``meshforge data prepare --output s3://bucket/prefix``: prepare locally, upload as shards finish, manifest last.

The shards are written into a staging dir, ``<cache_dir>/upload/<sha256(url)[:16]>/`` (the
ordinary prepared-dir layout, :mod:`.layout`); a background thread watches its slice
done-markers and uploads each finished slice's ``.idx`` and ``.bin`` while the next slices
are tokenized. Once every slice is done and merged, the tokenizer and then ``manifest.json``
go up, last, so a prefix without a manifest is never mistaken for a data set.

A re-run with the same inputs resumes: finished slices are not tokenized again (the
staging dir keeps their markers) and objects already in the store with the right size are
not uploaded again. The staging dir is removed once the manifest is up.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Callable

from meshforge.data_pipeline.errors import DataError
from meshforge.data_pipeline.layout import MANIFEST, WORK_DIR, read_json
from meshforge.data_pipeline.remote import RemoteStore
from meshforge.data_pipeline.remote_cache import cache_path
from meshforge.tokenizers import TOKENIZER_FILES


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


def prepare_to_url(url: str, cache_dir: Path, prepare: Callable[..., dict], overwrite: bool = False,
                   num_nodes: int = 1, **kwargs) -> dict:
    """Run ``prepare(output_dir=staging, **kwargs)`` (``prepare_data``) and upload its result to ``url``."""
    store = RemoteStore(url)
    if num_nodes != 1:
        raise DataError(f"--output {store.url}: an upload is prepared on one node (num_nodes = 1); prepare into a shared "
                        "dir on several nodes, merge, then copy it up")
    if store.exists(MANIFEST) and not overwrite:
        raise DataError(f"{store.url_of(MANIFEST)} exists: that prefix holds a data set; pass --overwrite to replace it "
                        "or choose another prefix")
    staging = Path(cache_dir) / "upload" / cache_path(store.url, Path(cache_dir)).name
    try:
        staging.mkdir(parents=True, exist_ok=True)
        (staging / MANIFEST).unlink(missing_ok=True)  # merged again from the kept markers (a re-run resumes)
    except OSError as exc:
        raise DataError(f"the staging dir {staging} cannot be written ({exc.strerror}): set data.cache_dir / "
                        "$MESHFORGE_CACHE to a writable dir with room for the shards") from None
    uploader = _Uploader(store, staging, replace=overwrite).start()
    try:
        manifest = prepare(output_dir=str(staging), overwrite=overwrite, num_nodes=1, node_rank=0, **kwargs)
    finally:
        uploader._stop.set()
    uploader.finish()
    for name in TOKENIZER_FILES:  # a sentencepiece .model, or tokenizer.json + its config
        if (staging / name).is_file():
            store.put_file(staging / name, name)
    store.put_file(staging / MANIFEST, MANIFEST)
    shutil.rmtree(staging, ignore_errors=True)
    return manifest

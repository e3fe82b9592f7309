"""`vitp features` that stops dead at a chosen point, for the kill-and-resume tests.

Run as ``python pausing_features.py features ...`` (or under torchrun). With ``VITP_TEST_PAUSE_AT`` set,
rank 0 writes the file ``VITP_TEST_PAUSE_MARKER`` and sleeps when it reaches that point; the test then
kills every process with SIGKILL, so the run stops exactly there. Points:

* ``partial-manifest``: before the unfinished run's manifest.json is written (a run killed while starting);
* ``first-shard``: right after rank 0 wrote its first shard;
* ``mid-shard``: after the first shard, once one more batch is buffered but not yet written;
* ``output-manifest``: every shard of the output written (an embedding store's, or the .npz's rows), but
  not the output's manifest (``store.json``) / the ``.npz`` itself.
The patches only wrap vitp's own functions; nothing in vitp knows about them.
"""

import os
import sys
import time
from pathlib import Path

from vitp.cli import main
from vitp.retrieval import embedding_store
from vitp.retrieval.extract import store

POINT = os.environ.get("VITP_TEST_PAUSE_AT", "")
IS_RANK_0 = os.environ.get("RANK", "0") == "0"


def pause() -> None:
    Path(os.environ["VITP_TEST_PAUSE_MARKER"]).write_text(str(os.getpid()))
    time.sleep(3600)


def pause_before(function, point, when=lambda *args, **kwargs: True):
    def wrapped(*args, **kwargs):
        if POINT == point and IS_RANK_0 and when(*args, **kwargs):
            pause()
        return function(*args, **kwargs)
    return wrapped


store.write_json = pause_before(store.write_json, "partial-manifest", lambda data, path: Path(path).name == "manifest.json")
embedding_store.write_manifest = pause_before(embedding_store.write_manifest, "output-manifest")
store.save_features = pause_before(store.save_features, "output-manifest")

flush, add = store.ShardWriter.flush, store.ShardWriter.add


def flush_then_pause(self):
    wrote = len(self) > 0
    flush(self)
    if wrote and POINT == "first-shard" and IS_RANK_0:
        pause()


def add_then_pause(self, *args):
    add(self, *args)
    if POINT == "mid-shard" and IS_RANK_0 and self.number >= 1:
        pause()


store.ShardWriter.flush = flush_then_pause
store.ShardWriter.add = add_then_pause

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

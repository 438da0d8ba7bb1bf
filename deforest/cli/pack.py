"""``deforest-pack``: convert the configured dataset (``data=...``) into a packed store,
or (``check=true``) check an existing pack against its sources."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from deforest.cli.errors import exit_on_user_error
from deforest.cli.overrides import checked_overrides
from deforest.core.outputs import check_outputs
from deforest.core.vocabulary import CONFIG_PATH
from deforest.data.stores.packing import PackResult, check_pack, pack_dataset

log = logging.getLogger(__name__)


def pack(cfg: DictConfig) -> PackResult | None:
    """Pack ``cfg.data.layout`` into ``cfg.out`` (or only check it) and log what happened."""
    layout = instantiate(cfg.data.layout)
    if cfg.get("check"):
        check_pack(layout, cfg.out)
        log.info("%s matches its sources under %s", cfg.out, layout.root)
        return None

    def progress(done: int, total: int) -> None:
        log.info("packed %d/%d tiles", done, total)

    remote = "://" in str(cfg.out)
    if not remote:  # the pack is never written into (or over) the tiles it packs
        check_outputs({"out": cfg.out}, {"data.root": layout.root, "manifest": getattr(layout, "manifest", None)}, files=False)
    # an object-store pack is built (and resumable) in the cache, then copied up
    local = Path(cfg.paths.cache_dir) / "packs" / hashlib.sha256(str(cfg.out).encode()).hexdigest()[:16] if remote else cfg.out
    result = pack_dataset(layout, local, progress=progress, num_workers=cfg.num_workers, shard_tiles=cfg.shard_tiles)
    if remote:
        from deforest.data.stores.remote import upload_pack  # the stream extra

        upload_pack(local, str(cfg.out), chunk_tiles=cfg.chunk_tiles)
        log.info("uploaded %s to %s", local, cfg.out)
    verb = "wrote" if result.written else "up to date:"
    resumed = f", resumed after {result.resumed} finished shard(s)" if result.resumed else ""
    log.info("%s %s (%d tiles, %s %s%s)", verb, result.path, result.tiles, result.dtype, list(result.shape[1:]), resumed)
    return result


@checked_overrides("pack")
@hydra.main(version_base="1.3", config_path=CONFIG_PATH, config_name="pack")
def main(cfg: DictConfig) -> None:
    with exit_on_user_error():
        pack(cfg)


if __name__ == "__main__":
    main()

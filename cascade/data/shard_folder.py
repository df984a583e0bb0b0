"""A shard folder as readers see it: its dataset.json, and the shard urls of one split.

A shard folder (written by `cascade.data.shards.write_shards`) holds `train-%06d.tar`, `val-%06d.tar` and
`dataset.json`; readers also accept a webdataset url pattern (`a-{000000..000009}.tar`) or a list of urls
(local paths, `pipe:` commands, remote urls), whose dataset.json is read when one lies beside the first local
shard. Every failure is a FileNotFoundError or ValueError with a one-line reason.
"""

from __future__ import annotations

import json
from pathlib import Path

import webdataset as wds

from cascade.checks import is_auto_or_bool
from cascade.errors import plural

SPLITS = ("train", "val")
REQUIRED_FIELDS = ("resolutions", "class_names", "counts", "shards")


def read_dataset_info(root: str | Path) -> dict:
    """The dataset.json of a shard folder as a dict holding at least `REQUIRED_FIELDS`.

    Raises FileNotFoundError (no folder, no dataset.json) or ValueError (not JSON, a required field missing).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    path = root / "dataset.json"
    if not path.is_file():
        raise FileNotFoundError(f"{root} has no dataset.json (write shards with tools/make_shards.py)")
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    for field in REQUIRED_FIELDS:
        if field not in info:
            raise ValueError(f"{path} lacks the field {field!r}")
    return info


def dataset_hflip(info: dict | None, setting: str | bool = "auto") -> bool:
    """Whether training flips images horizontally at random. ``setting`` "auto" follows the dataset's declaration
    (dataset.json "hflip", written by `cascade.data.shards.write_shards` from its source: False for digits; shards
    written before the field existed, or url lists without dataset.json, count as mirror-symmetric); True / False
    override it. Raises ValueError for any other setting."""
    if not is_auto_or_bool(setting):
        raise ValueError(f"hflip must be auto, true or false, got {setting!r}")
    if setting == "auto":
        return bool((info or {}).get("hflip", True))
    return setting


def is_local(url: str) -> bool:
    """Whether a shard url is a path on this machine (not `pipe:` and no scheme)."""
    return "://" not in url and not url.startswith("pipe:")


def resolve_shards(root_or_urls: str | Path | list | tuple, split: str) -> tuple[list[str], dict | None, str]:
    """(shard urls, dataset.json or None, description for messages) of one split (`"train"` or `"val"`).

    A shard folder gives its split's shards from dataset.json; a pattern or list is taken as that split's shards.
    Raises ValueError (unknown split, no shards, the folder has none of the split) or FileNotFoundError (a local
    path or shard that does not exist; a folder's missing shards are all named, up to five).
    """
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if isinstance(root_or_urls, (list, tuple)):
        urls = [str(u) for u in root_or_urls]
    else:
        text = str(root_or_urls)
        if Path(text).is_dir():
            info = read_dataset_info(text)
            names = info["shards"].get(split, [])
            if not names:
                total = info["counts"].get(split, {}).get("total", 0)
                raise ValueError(f"dataset {text} has no {split} shards ({plural(total, f'{split} sample')}); "
                                 "rewrite it with tools/make_shards.py"
                                 + (" and a larger --val-fraction" if split == "val" else ""))
            absent = [n for n in names if not (Path(text) / n).is_file()]
            if absent:
                shown = ", ".join(absent[:5]) + (", …" if len(absent) > 5 else "")
                raise FileNotFoundError(f"dataset {text}: dataset.json lists {plural(len(absent), f'{split} shard')} "
                                        f"that {'is' if len(absent) == 1 else 'are'} missing ({shown}); restore "
                                        f"{'it' if len(absent) == 1 else 'them'} or rewrite the dataset with tools/make_shards.py --overwrite")
            return [str(Path(text) / n) for n in names], info, text
        if is_local(text) and "{" not in text and "::" not in text and not Path(text).exists():
            raise FileNotFoundError(f"dataset not found: {text}")
        urls = wds.shardlists.expand_urls(text)
    if not urls:
        raise ValueError(f"no shards in {root_or_urls!r}")
    missing = [u for u in urls if is_local(u) and not Path(u).is_file()]
    if missing:
        raise FileNotFoundError(f"{plural(len(missing), 'shard')} not found, e.g. {missing[0]}")
    info = None
    if is_local(urls[0]) and (Path(urls[0]).parent / "dataset.json").is_file():
        info = read_dataset_info(Path(urls[0]).parent)
    return urls, info, str(root_or_urls)

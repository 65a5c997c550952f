"""The DiT's classes by name, for stage=sample: `sample.labels` may name a class (its wnid, or its name in
data.class_map's name column) instead of giving its index, and the class grid writes each row's class beside it.

    classes = ClassNames.of_data(cfg.data, num_classes=1000)
    classes.index("tench"), classes.index("n01440764")      # 0, 0 (names and wnids ignore case)
    classes.label(0)                                         # "0 tench"

The names are those the data config lists (shared/data: an image folder's wnid folders or its class map's names, a
webdataset's manifest wnids, the synthetic classes' descriptions). No checkpoint records them, so cfg.data must
describe the data the DiT was trained on; a data set with another number of classes is refused.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from omegaconf import DictConfig

from shared.data.image_folder import read_class_map
from shared.data.images import make_image_loader
from shared.errors import ConfigError, DataError


class ClassNames:
    """names[i] of class i (None where the data has no class i), and the class indices each name or wnid gives."""

    def __init__(self, names: Sequence[str | None], wnids: Mapping[str, int]):
        self.names = list(names)
        self._indices: dict[str, list[int]] = {}  # casefolded name or wnid -> its classes (ImageNet has two "crane")
        for key, index in [*((name, i) for i, name in enumerate(self.names)), *wnids.items()]:
            if key is not None and index not in self._indices.setdefault(key.casefold(), []):
                self._indices[key.casefold()].append(index)

    @classmethod
    def of_data(cls, data_cfg: DictConfig, num_classes: int) -> ClassNames:
        """The class names the data config lists for its training split (wnids too where data.class_map names
        them), checked to be `num_classes`, the DiT's."""
        names = make_image_loader(data_cfg, "train", 1, train=False, num_workers=0).dataset.class_names
        if names is None:
            raise DataError(f"data.kind={data_cfg.kind} lists no class names (webdataset shards without the "
                            "manifest.json of stage=shards beside them)")
        if len(names) != num_classes:
            raise ConfigError(f"data.kind={data_cfg.kind} has {len(names)} classes and the DiT {num_classes}: give "
                              "the data=... settings the DiT was trained on")
        class_map = data_cfg.get("class_map")
        return cls(names, read_class_map(class_map)[0] if class_map else {})

    def index(self, name: str) -> int:
        """The class that `name` (a class name or wnid, any case) names, or a ConfigError saying why none."""
        found = self._indices.get(name.casefold(), [])
        if len(found) > 1:
            raise ConfigError(f"sample.labels: {name!r} names classes {found}; give the one you mean as an index")
        if not found:
            known = [name for name in self.names if name is not None]
            raise ConfigError(f"sample.labels: no class {name!r} among the data's {len(known)} classes "
                              f"(e.g. {', '.join(known[:5])})")
        return found[0]

    def label(self, index: int) -> str:
        """"index name", or the index alone where the data has no class of that index."""
        name = self.names[index]
        return str(index) if name is None else f"{index} {name}"

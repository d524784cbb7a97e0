"""What a batch run is asked for: ``BatchSettings`` (shared by every item), ``BatchItem`` (one
manifest row, resolved) and ``settings_hash`` (what decides an item's views, for resume)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

from ..config import DiffusionConfig
from ..errors import ConfigError

# DiffusionConfig fields left out of the settings hash, because they decide how the views are
# computed, not what they are: ``low_memory`` only frees models between stages (same numbers);
# ``compile`` and the attention kernel (``attention``, ``attention_chunk_size``,
# ``use_flash_attention``) compute the same function and differ from each other only by float
# rounding (within 1e-4), as two backends or devices do, which are not hashed either. Changing
# one of them therefore resumes a run instead of redoing it. Every other field is hashed, new
# ones included, so a setting added later can only make a run redo items, never skip them.
HOW_NOT_WHAT = frozenset({"low_memory", "compile", "attention", "attention_chunk_size", "use_flash_attention"})
# Fields each item sets for itself (a manifest column, or the config's value as that item's
# default): hashed through the item, not the config.
PER_ITEM = frozenset({"seed", "elevation", "num_views"})


@dataclass(frozen=True)
class BatchSettings:
    """What every item of a batch shares: the model, how to run it, and one ``DiffusionConfig``.

    All generation settings (steps, guidance, dtype, attention, eta, ip_weight, compile,
    low_memory, …) come from ``config``. ``config.seed``, ``config.elevation``, ``azimuths`` and
    ``prompt`` are the defaults of rows that do not set their own (a row without ``seed`` gets
    ``config.seed + row index``). ``azimuths``, when set, decide the view count
    (``config.num_views`` is made to match). Plain data: ``to_dict()`` / ``from_dict()`` carry it
    to Ray workers.
    """

    model: str
    config: DiffusionConfig = field(default_factory=DiffusionConfig)
    upsampler: str | None = None
    backend: str = "auto"
    device: str | None = None
    azimuths: tuple[float, ...] | None = None
    prompt: str = ""
    negative_prompt: str = ""
    size: int | None = None

    def __post_init__(self):
        if not isinstance(self.config, DiffusionConfig):
            raise ConfigError(f"config must be a DiffusionConfig; got {type(self.config).__name__}")
        for name in ("model", "backend", "prompt", "negative_prompt"):
            if not isinstance(getattr(self, name), str):
                raise ConfigError(f"{name} must be a string; got {getattr(self, name)!r}")
        for name in ("upsampler", "device"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ConfigError(f"{name} must be a string or None; got {getattr(self, name)!r}")
        if self.size is not None and (isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1):
            raise ConfigError(f"size must be None or an integer >= 1; got {self.size!r}")
        if self.azimuths is not None:
            try:
                azimuths = tuple(float(a) for a in self.azimuths)
            except (TypeError, ValueError):
                raise ConfigError(f"azimuths must be a list of numbers; got {self.azimuths!r}") from None
            if not azimuths:
                raise ConfigError("azimuths must not be empty (None: the model's default orbit)")
            object.__setattr__(self, "azimuths", azimuths)
            if self.config.num_views != len(azimuths):
                object.__setattr__(self, "config", self.config.replace(num_views=len(azimuths)))

    def to_dict(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["config"] = self.config.to_dict()
        data["azimuths"] = list(self.azimuths) if self.azimuths is not None else None
        return data

    @classmethod
    def from_dict(cls, data: dict) -> BatchSettings:
        data = dict(data)
        data["config"] = DiffusionConfig.from_dict(data.get("config", {}))
        return cls(**data)

    def load_pipeline(self):
        from ..pipeline import Pipeline

        return Pipeline.from_pretrained(self.model, backend=self.backend, device=self.device,
                                        upsampler=self.upsampler, config=self.config)


@dataclass(frozen=True)
class BatchItem:
    """One manifest row, resolved: ``image`` is the path to read, ``source`` as the manifest wrote it."""

    id: str
    image: str
    source: str
    seed: int
    prompt: str
    azimuths: tuple[float, ...] | None
    elevation: float
    row: int

    @property
    def num_views(self) -> int | None:
        return len(self.azimuths) if self.azimuths else None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> BatchItem:
        data = dict(data)
        if data.get("azimuths") is not None:
            data["azimuths"] = tuple(data["azimuths"])
        return cls(**data)


def item_views(settings: BatchSettings, item: BatchItem) -> int:
    """How many views ``item`` gets: its own azimuths, else the settings'."""
    return item.num_views or settings.config.num_views


def settings_hash(settings: BatchSettings, item: BatchItem) -> str:
    """sha256 (16 hex digits) of everything that decides an item's views (see ``HOW_NOT_WHAT``)."""
    config = {k: v for k, v in settings.config.to_dict().items() if k not in HOW_NOT_WHAT | PER_ITEM}
    data = {"model": settings.model, "upsampler": settings.upsampler, "size": settings.size,
            "negative_prompt": settings.negative_prompt, "config": config,
            "image": item.source, "seed": item.seed, "prompt": item.prompt, "elevation": item.elevation,
            "azimuths": list(item.azimuths) if item.azimuths else None, "views": item_views(settings, item)}
    text = json.dumps(data, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]

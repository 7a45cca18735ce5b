"""The profile artifact: what calibration decided about one model, in one safetensors file.

Tensors hold the per-channel statistics; the JSON metadata holds the model's sha256, the taps, every setting, the
thresholds and the calibration figures. Nothing is pickled, so a profile from an untrusted source is safe to read;
anything malformed is reported as a ProfileError naming what is wrong.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, get_args

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save as safetensors_bytes

from guard._version import __version__
from guard.errors import ProfileError
from guard.model.graph import FoldMode
from guard.runtime.checks import ConsistencyCheck, DistancePart, InputEnvelope, Part, ScorePart
from guard.samples import write_atomic

# 2: thresholds gained `cut`. 3: thresholds gained the score's `parts`, which change what tau means; a guard that
# reads only format 2 would score a format-3 profile the old way against the new tau, so it must refuse it instead.
# 4: a part may be a distance (`kind`, with its class means and whitening matrix among the tensors); a format-3 guard
# would read it as a top-q part, so format 4 is refused there. 5: thresholds may name a suspected backdoor target
# (`suspect`, `suspect_demote`); a format-4 guard would answer that class as before, with less protection than the
# profile promises, so format 5 is refused there. 6: the profile may carry a reference (a fine-tuned copy of the
# model's weights, tensors "reference/NAME") and the threshold past which it overrules the model (`overrule`); a
# format-5 guard would ignore it, so format 6 is refused there. Format 6 later gained `confirm` (the reference's
# probability that spares a demotion) and `confirm_ceiling` (the score above which nothing is spared); a format-6
# guard that ignores them demotes more requests, never fewer, so it reads such a profile with as much protection as
# it promises, and the format stayed. 7: thresholds may name the warp scan's class (`warp_class`) and a lower
# overrule threshold of its own (`warp_overrule`); a format-6 guard would overrule fewer requests than the profile
# promises, so format 7 is refused there. 8: the score may have a part outside the served graph, the model's lean
# towards the warp's class beyond the reference's (`lean_class`, standardised by `lean_centre` and `lean_spread`); tau
# was chosen on the score with it, so a format-7 guard would flag fewer requests than the profile promises, and format 8
# is refused there. Format 8 later gained a part's `demotes` (false: the part flags, and the demote thresholds are
# quantiles of the score over the other parts); a format-8 guard that ignores it demotes on every part, more requests,
# never fewer, and the format stayed. 9: the score may have a part on the request itself, its excess over the clean
# envelope of the input (tensor "input_bound", standardised by `envelope_centre` and `envelope_spread`); tau was chosen
# on the score with it, so a format-8 guard would flag fewer requests than the profile promises, and format 9 is
# refused there. 10: a request far outside the envelope may be demoted (`envelope_demote`, a threshold on the
# envelope's part alone); a format-9 guard would demote fewer requests than the profile promises, so format 10 is
# refused there.
FORMAT = "guard.profile/10"
# Format 9 reads with no envelope demotion, 8 with no envelope, 7 with no lean either, 6 with no warp class either,
# 5 with no reference; 4 and 3 with no suspect either, format 3 as top-q parts, format 2 as one unstandardised part,
# each as it scored.
# safetensors' names of the tensor types numpy reads; calibration writes F32 and U8.
_TENSOR_DTYPES = frozenset({"F64", "F32", "F16", "I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8", "BOOL"})
_READABLE = (FORMAT, *(f"guard.profile/{version}" for version in range(9, 1, -1)))
_REFERENCE = "reference/"  # the prefix of the reference's tensors
_INPUT_BOUND = "input_bound"  # the input envelope's (C, H, W) bound
_PART_KINDS = ("top_q", "distance")
TAP_KINDS = ("conv", "dense")
FOLD_MODES = get_args(FoldMode)
_TAP_ARRAYS = ("linf_mean", "linf_std", "linf_p99", "linf_p999", "peakedness", "salience", "benign", "keep")


@dataclass
class TapProfile:
    """What calibration learnt about one tap; every array is (C,)."""

    name: str
    kind: str  # "conv" (N, C, H, W) or "dense" (N, C)
    fold: str  # how the static mask is folded: consumer | producer | mul
    linf_mean: np.ndarray
    linf_std: np.ndarray
    linf_p99: np.ndarray
    linf_p999: np.ndarray
    peakedness: np.ndarray
    salience: np.ndarray
    benign: np.ndarray  # bool: in the benign set B
    keep: np.ndarray  # bool: False = pruned by the static mask
    unit_bound: np.ndarray | None = None  # conv taps: (C, H, W) largest clean activation of each unit

    @property
    def channels(self) -> int:
        return int(self.keep.shape[0])

    @property
    def observable(self) -> np.ndarray:
        """Channels whose ℓ∞ the served graph still reports (a producer fold zeroes the pruned ones)."""
        return self.keep.copy() if self.fold == "producer" else np.ones_like(self.keep)


@dataclass(eq=False)
class PartScale:
    """One part of the score (guard.runtime.checks), named by its taps, with its clean standardisation. A distance part
    covers the observable channels of its taps and carries its class means and whitening matrix."""

    taps: list[str]
    centre: float
    spread: float
    kind: str = "top_q"  # "top_q" (ScorePart) or "distance" (DistancePart)
    class_mean: np.ndarray | None = None  # distance: (K, D)
    whiten: np.ndarray | None = None  # distance: (D, D)
    demotes: bool = True  # False: the part only flags (guard.runtime.checks)

    @classmethod
    def of(cls, taps: list[str], part: Part) -> PartScale:
        if isinstance(part, DistancePart):
            return cls(list(taps), part.centre, part.spread, "distance", part.class_mean, part.whiten, part.demotes)
        return cls(list(taps), part.centre, part.spread, demotes=part.demotes)

    def as_json(self) -> dict[str, Any]:
        return {"taps": self.taps, "centre": self.centre, "spread": self.spread, "kind": self.kind,
                "demotes": self.demotes}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PartScale):
            return NotImplemented
        return self.as_json() == other.as_json() and all(
            (mine is None) == (theirs is None) and (mine is None or np.array_equal(mine, theirs))
            for mine, theirs in ((self.class_mean, other.class_mean), (self.whiten, other.whiten)))


@dataclass
class Thresholds:
    k: float  # a channel is compromised when its z exceeds k
    tau: float  # a request is flagged when its score exceeds tau
    top_q: int  # the score is the mean of the top_q z values
    cut: float  # the benign re-prediction zeroes channels of taps without unit bounds whose z exceeds this
    # Above this score the guard answers the best class other than the model's own (inf: never). Profiles written
    # before it existed load with inf, and behave as they did.
    demote: float = math.inf
    # The score's parts; [] = one unstandardised part over all taps, as profiles written before parts existed score.
    parts: list[PartScale] = field(default_factory=list)
    # The class `guard scan` named as the likely backdoor target (None: none named), and the threshold of its own
    # above which a request the model answers with it is demoted (inf: never).
    suspect: int | None = None
    suspect_demote: float = math.inf
    # Where the profile carries a reference: the disagreement (guard.calibrate.reference) past which the reference's
    # answer replaces the model's (inf: no reference).
    overrule: float = math.inf
    # Where the profile carries a reference: the probability the reference must give the model's answer for a request
    # past a demote threshold (the general one or the suspect's) to keep it (None: every such request is demoted),
    # and the score above which no confirmation spares one (the highest clean calibration score; inf: no ceiling).
    confirm: float | None = None
    confirm_ceiling: float = math.inf
    # Where the profile carries a reference and the warp scan named a class: that class, and the disagreement past
    # which the reference overrules the model's answers of it, at most `overrule` (None and inf: no such class).
    warp_class: int | None = None
    warp_overrule: float = math.inf
    # Where the profile carries a reference that unlearned a warp: the warp's class, whose lean (the probability the
    # model gives it minus the reference's, guard.runtime.reference.lean) is a part of the score, standardised by
    # this centre and spread (None: no such part).
    lean_class: int | None = None
    lean_centre: float | None = None
    lean_spread: float | None = None
    # Where the profile has an input envelope (Profile.input_bound): the clean centre and spread that standardise its
    # part of the score (None: no such part).
    envelope_centre: float | None = None
    envelope_spread: float | None = None
    # ... and the envelope part's score above which a request whose re-prediction keeps the model's answer is demoted
    # (inf: never; a request past it is flagged, so it is at least tau).
    envelope_demote: float = math.inf

    def as_json(self) -> dict[str, Any]:
        """The thresholds as a JSON object (an infinite demote threshold, demotion off, is null; a distance part's
        arrays live among the profile's tensors)."""
        return {"k": self.k, "tau": self.tau, "top_q": self.top_q, "cut": self.cut,
                "demote": _finite_or_null(self.demote), "parts": [part.as_json() for part in self.parts],
                "suspect": self.suspect, "suspect_demote": _finite_or_null(self.suspect_demote),
                "overrule": _finite_or_null(self.overrule), "confirm": self.confirm,
                "confirm_ceiling": _finite_or_null(self.confirm_ceiling), "warp_class": self.warp_class,
                "warp_overrule": _finite_or_null(self.warp_overrule), "lean_class": self.lean_class,
                "lean_centre": self.lean_centre, "lean_spread": self.lean_spread,
                "envelope_centre": self.envelope_centre, "envelope_spread": self.envelope_spread,
                "envelope_demote": _finite_or_null(self.envelope_demote)}


def confirming_probability(value: object) -> bool:
    """Whether `value` may be the reference's confirming probability: a number in [0.5, 1] (below a half, the
    reference would confirm an answer it thinks more likely wrong)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.5 <= value <= 1


def _finite_or_null(value: float) -> float | None:
    return None if math.isinf(value) else value


@dataclass
class Profile:
    """Everything the runtime needs to guard one model."""

    model_sha256: str
    input_name: str
    output_name: str
    num_classes: int
    taps: list[TapProfile]
    class_mean: np.ndarray  # (K, C_total)
    class_scale: np.ndarray  # (K, C_total)
    thresholds: Thresholds
    settings: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, Any] = field(default_factory=dict)
    guard_version: str = __version__
    # The reference's weights (guard.calibrate.reference): the model's initializers that fine-tuning changed, by name.
    reference: dict[str, np.ndarray] = field(default_factory=dict)
    # The largest clean value of each input element (C, H, W), the input envelope's bound (None: no such part).
    input_bound: np.ndarray | None = None

    @property
    def tap_names(self) -> list[str]:
        return [tap.name for tap in self.taps]

    def keep_masks(self) -> dict[str, np.ndarray]:
        return {tap.name: tap.keep for tap in self.taps}

    def unit_bounds(self) -> dict[str, np.ndarray]:
        return {tap.name: tap.unit_bound for tap in self.taps if tap.unit_bound is not None}

    def channels_of(self, tap_names: list[str]) -> np.ndarray:
        """Indices of the named taps' channels in the concatenated channel order."""
        starts = np.cumsum([0] + [tap.channels for tap in self.taps])
        index = {tap.name: i for i, tap in enumerate(self.taps)}
        return np.concatenate([np.arange(starts[index[name]], starts[index[name] + 1]) for name in tap_names])

    @property
    def active(self) -> np.ndarray:
        """(C_total,) the channels the check reads, in the concatenated order."""
        return np.concatenate([tap.observable for tap in self.taps])

    def part_channels(self, part: PartScale) -> np.ndarray:
        """A part's channels: all of its taps' for a top-q part (inactive ones read z = 0), the observable ones for a
        distance."""
        channels = self.channels_of(part.taps)
        return channels[self.active[channels]] if part.kind == "distance" else channels

    def check(self) -> ConsistencyCheck:
        parts: list[Part] = []
        for part in self.thresholds.parts:
            channels = self.part_channels(part)
            if part.kind == "distance":
                parts.append(DistancePart(channels, part.class_mean, part.whiten, part.centre, part.spread,
                                          part.demotes))
            else:
                parts.append(ScorePart(channels, part.centre, part.spread, part.demotes))
        return ConsistencyCheck(
            class_mean=self.class_mean,
            class_scale=self.class_scale,
            active=self.active,
            top_q=self.thresholds.top_q,
            k=self.thresholds.k,
            cut=self.thresholds.cut,
            parts=tuple(parts),
        )

    def envelope(self) -> InputEnvelope | None:
        """The score's part on the request itself, if the profile has one."""
        if self.input_bound is None:
            return None
        return InputEnvelope(self.input_bound, self.thresholds.envelope_centre, self.thresholds.envelope_spread)

    def verify_model(self, sha256: str) -> None:
        if sha256 != self.model_sha256:
            raise ProfileError(
                f"this profile was calibrated for a different model (profile sha256 {self.model_sha256[:12]}…, "
                f"model sha256 {sha256[:12]}…); run `guard calibrate` on this model"
            )

    def validate(self) -> None:
        """Refuse NaN among the thresholds and statistics of a profile built in memory (calibrate's, or a caller's),
        which is served without ever being loaded, where the loader refuses them: a NaN tau flags everything, a NaN
        k marks no channel, and nothing is re-predicted. (Infinities mean "off" in memory.)"""
        t = self.thresholds
        numbers = [t.k, t.tau, t.cut, t.demote, t.suspect_demote, t.overrule, t.confirm_ceiling, t.warp_overrule,
                   t.envelope_demote, *(v for v in (t.confirm, t.lean_centre, t.lean_spread, t.envelope_centre,
                                                    t.envelope_spread) if v is not None),
                   *(v for part in t.parts for v in (part.centre, part.spread))]
        arrays = [self.class_mean, self.class_scale, *(a for p in t.parts for a in (p.class_mean, p.whiten)
                                                       if a is not None)]
        if any(math.isnan(float(v)) for v in numbers) or any(np.isnan(a).any() for a in arrays):
            raise ProfileError("the profile's thresholds or class statistics hold NaN; run guard calibrate again")

    def save(self, path: str | Path) -> Path:
        """Write the profile whole, with the file mode the umask gives (safetensors' own writer makes it 0600, which
        a server running as another user cannot read), and only if it loads back: a profile every command would
        refuse (statistics that overflowed float32, say) must not replace a good one."""
        path = Path(path)
        tensors = {"class_mean": self.class_mean, "class_scale": self.class_scale}
        for index, tap in enumerate(self.taps):
            for name in _TAP_ARRAYS:
                value = getattr(tap, name)
                tensors[f"taps.{index}.{name}"] = value.astype(np.uint8 if name in _MASKS else np.float32)
            if tap.unit_bound is not None:
                tensors[f"taps.{index}.unit_bound"] = tap.unit_bound.astype(np.float32)
        for index, part in enumerate(self.thresholds.parts):
            if part.kind == "distance":
                tensors[f"parts.{index}.class_mean"] = part.class_mean.astype(np.float32)
                tensors[f"parts.{index}.whiten"] = part.whiten.astype(np.float32)
        tensors.update({_REFERENCE + name: value for name, value in self.reference.items()})
        if self.input_bound is not None:
            tensors[_INPUT_BOUND] = self.input_bound.astype(np.float32)
        meta = {
            "format": FORMAT,
            "guard_version": self.guard_version,
            "model_sha256": self.model_sha256,
            "input_name": self.input_name,
            "output_name": self.output_name,
            "num_classes": self.num_classes,
            "taps": [{"name": t.name, "kind": t.kind, "fold": t.fold} for t in self.taps],
            "thresholds": self.thresholds.as_json(),
            "settings": self.settings,
            "figures": self.figures,
        }
        data = safetensors_bytes({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                                 metadata={"guard": json.dumps(meta)})

        def write(tmp: Path) -> None:
            tmp.write_bytes(data)
            try:
                Profile.load(tmp)
            except ProfileError as exc:
                reason = str(exc).replace(str(tmp), "it")
                raise ProfileError(f"the profile computed would not load, so {path} is left as it was: {reason}"
                                   ) from None

        return write_atomic(path, write, errors=(OSError, SafetensorError))

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        path = Path(path)
        try:  # is_file raises for a name too long or a folder that may not be entered; safetensors says "No such
            if not path.is_file():  # file or directory" for a file it may not read, so it is opened here first
                raise ProfileError(f"profile not found: {path}" if not path.exists() else
                                   f"{path} is not a regular file; give the profile guard calibrate wrote")
            path.open("rb").close()
        except OSError as exc:
            raise ProfileError(f"cannot read the profile {path}: {exc.strerror or exc}") from None
        try:  # one handle for the metadata and the tensors: a profile renamed over this one between two reads
            with safe_open(str(path), framework="numpy") as handle:  # would pair its thresholds with our tensors
                raw_meta = (handle.metadata() or {}).get("guard")
                odd = {key: dtype for key in handle.keys()
                       if (dtype := handle.get_slice(key).get_dtype()) not in _TENSOR_DTYPES}
                if odd:  # numpy has no fp8 or bf16: reading one failed with an AttributeError or TypeError
                    raise ProfileError(f"{path} holds tensors of a type a guard profile never has: {odd}")
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        except (SafetensorError, OSError, ValueError) as exc:
            raise ProfileError(f"{path} is not a readable profile (corrupt or not safetensors): {exc}") from None
        if raw_meta is None:
            raise ProfileError(f"{path} is a safetensors file but not a guard profile (no 'guard' metadata)")
        try:
            meta = json.loads(raw_meta)
            return cls._from_parts(meta, tensors)
        except (KeyError, TypeError, ValueError, OverflowError, RecursionError) as exc:
            raise ProfileError(f"{path} is a malformed guard profile: {type(exc).__name__}: {exc}") from None

    @classmethod
    def _from_parts(cls, meta: dict[str, Any], tensors: dict[str, np.ndarray]) -> Profile:
        given = tensors
        # The guard computes its statistics in float32: a float64 value that is finite and positive as stored may
        # overflow to inf or underflow to 0 there, so every check below is made on the float32 value.
        with np.errstate(over="ignore", under="ignore"):  # the reference's weights keep the model's own dtype
            tensors = {key: value.astype(np.float32)
                       if np.issubdtype(value.dtype, np.floating) and not key.startswith(_REFERENCE) else value
                       for key, value in tensors.items()}
        if not isinstance(meta, dict):
            raise ValueError(f"the guard metadata must be a JSON object, got {type(meta).__name__}")
        if meta.get("format") == "guard.profile/1":
            raise ValueError("this profile was written by an older guard (format 1); run `guard calibrate` again")
        if meta.get("format") not in _READABLE:
            raise ValueError(f"unknown profile format {meta.get('format')!r}, expected {FORMAT!r}")
        version = int(meta["format"].rsplit("/", 1)[1])
        taps = []
        for index, tap in enumerate(meta["taps"]):
            arrays = {name: tensors[f"taps.{index}.{name}"] for name in _TAP_ARRAYS}
            channels = {a.shape for a in arrays.values()}
            if len(channels) != 1 or len(next(iter(channels))) != 1:
                raise ValueError(f"tap {tap['name']!r} has inconsistent array shapes {sorted(channels)}")
            arrays["benign"] = arrays["benign"].astype(bool)
            arrays["keep"] = arrays["keep"].astype(bool)
            bound = tensors.get(f"taps.{index}.unit_bound")
            if bound is not None and (bound.ndim != 3 or bound.shape[0] != len(arrays["keep"])):
                raise ValueError(f"tap {tap['name']!r} has a unit bound of shape {bound.shape}")
            if bound is not None and not np.isfinite(bound).all():  # a NaN bound would switch the cut off
                raise ValueError(f"tap {tap['name']!r} has a unit bound that is not finite")
            if tap["kind"] not in TAP_KINDS or tap["fold"] not in FOLD_MODES:
                raise ValueError(f"tap {tap['name']!r} has kind {tap['kind']!r} and fold {tap['fold']!r}; expected "
                                 f"one of {TAP_KINDS} and one of {FOLD_MODES}")
            taps.append(TapProfile(name=str(tap["name"]), kind=str(tap["kind"]), fold=str(tap["fold"]),
                                   unit_bound=bound, **arrays))
        names = [t.name for t in taps]
        if not names or len(set(names)) != len(names):  # the served graph reports each tap once, and needs one
            raise ValueError(f"a profile needs at least one tap, each named once; got {names}")
        total = sum(t.channels for t in taps)
        num_classes = meta["num_classes"]
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer of at least 2, got {num_classes!r}")
        for key in ("class_mean", "class_scale"):
            if tensors[key].shape != (num_classes, total):
                raise ValueError(f"{key} has shape {tensors[key].shape}, expected {(num_classes, total)}")
        scale = tensors["class_scale"]
        if not (np.all(scale > 0) and np.isfinite(scale).all() and np.isfinite(tensors["class_mean"]).all()):
            raise ValueError("class statistics must be finite with positive scales")
        profile = cls(
            model_sha256=str(meta["model_sha256"]),
            input_name=str(meta["input_name"]),
            output_name=str(meta["output_name"]),
            num_classes=num_classes,
            taps=taps,
            class_mean=tensors["class_mean"],
            class_scale=tensors["class_scale"],
            thresholds=_thresholds(meta["thresholds"], [tap.name for tap in taps], num_classes, version=version),
            settings=dict(meta["settings"]),
            figures=dict(meta["figures"]),
            guard_version=str(meta["guard_version"]),
        )
        for index, part in enumerate(profile.thresholds.parts):
            if part.kind == "distance":
                part.class_mean, part.whiten = _distance_arrays(profile, part, index, tensors)
        profile.reference = {key[len(_REFERENCE):]: value for key, value in tensors.items()
                             if key.startswith(_REFERENCE)}
        profile.input_bound = tensors.get(_INPUT_BOUND)
        if (profile.input_bound is None) != (profile.thresholds.envelope_centre is None):
            raise ValueError("the input envelope's bound and its centre and spread come together, or neither")
        if profile.input_bound is not None and (profile.input_bound.ndim != 3
                                                or not np.isfinite(profile.input_bound).all()):
            raise ValueError(f"the input envelope's bound must be finite with shape (C, H, W), got "
                             f"{profile.input_bound.shape}")
        if profile.reference and version < 6:
            raise ValueError("only a format-6 profile or later may carry a reference")
        if bool(profile.reference) == math.isinf(profile.thresholds.overrule):
            raise ValueError("a reference's weights and its overrule threshold come together, or neither")
        if profile.thresholds.warp_class is not None and not profile.reference:
            raise ValueError("a warp class's overrule threshold needs a reference to overrule with")
        if profile.thresholds.lean_class is not None and not profile.reference:
            raise ValueError("a warp's lean needs a reference to measure it against")
        if profile.thresholds.confirm is not None and not profile.reference:
            raise ValueError("a confirming probability needs a reference to confirm with")
        for name, value in profile.reference.items():  # which weights they may replace, the model says (Guard)
            if not name or not np.issubdtype(value.dtype, np.floating) or not np.isfinite(value).all():
                raise ValueError(f"the reference's weight {name!r} must be named, floating-point and finite")
        _check_tensors(meta, given)
        return profile

    def without_reference(self) -> Profile:
        """The same profile with no reference: the guard answers as the model and the check decide."""
        return replace(self, reference={}, thresholds=replace(self.thresholds, overrule=math.inf, confirm=None,
                                                              confirm_ceiling=math.inf, warp_class=None,
                                                              warp_overrule=math.inf, lean_class=None,
                                                              lean_centre=None, lean_spread=None))


_MASKS = ("benign", "keep")  # a tap's channel sets, written as U8; its other arrays are statistics
_PART_ARRAYS = ("class_mean", "whiten")  # a distance part's


def _check_tensors(meta: dict[str, Any], tensors: dict[str, np.ndarray]) -> None:
    """Refuse tensors a profile never has: a name the format does not define (read into memory and kept for
    nothing), a statistic that is not floating-point, a channel set of other values than 0 and 1. Run once the
    metadata is known good."""
    known = {"class_mean", "class_scale", _INPUT_BOUND,
             *(f"taps.{i}.{name}" for i in range(len(meta["taps"])) for name in (*_TAP_ARRAYS, "unit_bound")),
             *(f"parts.{i}.{name}" for i in range(len(meta["thresholds"].get("parts", [])))
               for name in _PART_ARRAYS)}
    unknown = sorted(key for key in tensors if key not in known and not key.startswith(_REFERENCE))
    if unknown:
        raise ValueError(f"tensors a profile does not have: {unknown[:5]}")
    for key, value in tensors.items():
        if key.startswith(_REFERENCE):
            continue  # checked above: named, floating-point and finite
        if key.rsplit(".", 1)[-1] in _MASKS and key.startswith("taps."):
            if value.dtype not in (np.uint8, np.bool_) or not np.isin(value, (0, 1)).all():
                raise ValueError(f"{key} must be a set of channels (0 or 1 each, U8), got {value.dtype}")
        elif not np.issubdtype(value.dtype, np.floating):
            raise ValueError(f"{key} must be floating-point, got {value.dtype}")


# The threshold keys each format writes (null where a part is off), from the format that added them. A key its
# format writes that is missing is refused, not read as off: a profile that lost "demote" would serve the backdoor's
# answers again, one that lost "parts" would score the old way against the new τ.
_THRESHOLD_KEYS = {2: ("k", "tau", "top_q", "cut"), 3: ("demote", "parts"), 5: ("suspect", "suspect_demote"),
                   6: ("overrule",), 7: ("confirm", "confirm_ceiling", "warp_class", "warp_overrule"),
                   8: ("lean_class", "lean_centre", "lean_spread"), 9: ("envelope_centre", "envelope_spread"),
                   10: ("envelope_demote",)}


def _thresholds(raw: dict[str, Any], tap_names: list[str], num_classes: int, *, version: int) -> Thresholds:
    """Thresholds with their types and ranges checked: a profile is untrusted input. Only format 5 and later may name
    a suspect, only format 6 a reference's threshold, only format 7 a warp class, only format 8 a warp's lean, only
    format 9 the input envelope, only format 10 its demotion."""
    if not isinstance(raw, dict):
        raise ValueError(f"the thresholds must be a JSON object, got {type(raw).__name__}")
    unknown = sorted(set(raw) - {key for keys in _THRESHOLD_KEYS.values() for key in keys})
    missing = [key for since, keys in _THRESHOLD_KEYS.items() if since <= version for key in keys if key not in raw]
    if unknown or missing:
        raise ValueError(f"the thresholds of a format-{version} profile " + "; ".join(
            text for text in (f"have unknown key(s) {unknown}" if unknown else "",
                              f"lack key(s) {missing}" if missing else "") if text))
    if version >= 3 and not raw["parts"]:
        raise ValueError("a format-3 profile or later scores at least one part; its thresholds have none")
    k, tau, top_q, cut = raw["k"], raw["tau"], raw["top_q"], raw["cut"]
    if not (_finite32(k) and _finite32(tau) and _finite32(cut)) or not whole_number(top_q) or top_q < 1:
        raise ValueError(f"thresholds must be finite numbers with an integer top_q >= 1, got {raw}")
    k, tau, cut = float(k), float(tau), float(cut)
    demote = _threshold_or_inf(raw, "demote", tau, "the demote threshold")
    if not isinstance(raw.get("parts", []), list):
        raise ValueError(f"the thresholds' parts must be a list, got {raw['parts']!r}")
    parts = [_part(part, tap_names) for part in raw.get("parts", [])]
    if parts and not any(part.demotes for part in parts):
        raise ValueError("at least one score part must demote; the demote thresholds are on those parts' score")
    if version < 5 and (raw.get("suspect") is not None or raw.get("suspect_demote") is not None):
        raise ValueError("only a format-5 profile or later may name a suspect")
    if version < 6 and raw.get("overrule") is not None:
        raise ValueError("only a format-6 profile or later may carry a reference")
    suspect = raw.get("suspect")
    suspect_demote = _threshold_or_inf(raw, "suspect_demote", tau, "the suspect's demote threshold")
    if suspect is None and not math.isinf(suspect_demote):
        raise ValueError(f"a suspect's demote threshold needs a suspect class, got {raw}")
    if suspect is not None and not (whole_number(suspect) and 0 <= suspect < num_classes):
        raise ValueError(f"the suspect must be a class number below {num_classes}, got {suspect!r}")
    overrule = _threshold_or_inf(raw, "overrule", 0.0, "the reference's overrule threshold", "0")
    confirm = raw.get("confirm")
    if confirm is not None and not confirming_probability(confirm):
        raise ValueError(f"the reference's confirming probability must be null or a number in [0.5, 1], got {raw}")
    confirm_ceiling = _threshold_or_inf(raw, "confirm_ceiling", tau, "the confirmation's score ceiling")
    if (confirm is None) != math.isinf(confirm_ceiling):  # unbounded, the reference would spare triggers it kept
        raise ValueError(f"a confirming probability and its score ceiling come together, or neither, got {raw}")
    if version < 7 and (raw.get("warp_class") is not None or raw.get("warp_overrule") is not None):
        raise ValueError("only a format-7 profile may name a warp class")
    warp_class = raw.get("warp_class")
    warp_overrule = _threshold_or_inf(raw, "warp_overrule", 0.0, "the warp class's overrule threshold", "0")
    if (warp_class is None) != math.isinf(warp_overrule) or (warp_class is not None and warp_overrule > overrule):
        raise ValueError(f"a warp class and its overrule threshold, at most the reference's, come together, or "
                         f"neither, got {raw}")
    if warp_class is not None and not (whole_number(warp_class) and 0 <= warp_class < num_classes):
        raise ValueError(f"the warp class must be a class number below {num_classes}, got {warp_class!r}")
    lean_class, lean_centre, lean_spread = _lean(raw, num_classes, version)
    envelope_centre, envelope_spread = _envelope(raw, version)
    envelope_demote = _threshold_or_inf(raw, "envelope_demote", tau, "the input envelope's demote threshold")
    if not math.isinf(envelope_demote) and (version < 10 or envelope_centre is None):
        raise ValueError("only a format-10 profile with an input envelope may demote on it")
    return Thresholds(k=k, tau=tau, top_q=top_q, cut=cut, demote=demote, parts=parts, suspect=suspect,
                      suspect_demote=suspect_demote, overrule=overrule,
                      confirm=None if confirm is None else float(confirm), confirm_ceiling=confirm_ceiling,
                      warp_class=warp_class, warp_overrule=warp_overrule, lean_class=lean_class,
                      lean_centre=lean_centre, lean_spread=lean_spread, envelope_centre=envelope_centre,
                      envelope_spread=envelope_spread, envelope_demote=envelope_demote)


def _envelope(raw: dict[str, Any], version: int) -> tuple[float | None, float | None]:
    """The input envelope part's finite centre and positive spread, or neither."""
    centre, spread = raw.get("envelope_centre"), raw.get("envelope_spread")
    if centre is None and spread is None:
        return None, None
    if version < 9:
        raise ValueError("only a format-9 profile may score the input envelope")
    if not (_finite32(centre) and _positive32(spread)):
        raise ValueError(f"the input envelope's part needs a finite centre and a positive spread, got {raw}")
    return float(centre), float(spread)


def _lean(raw: dict[str, Any], num_classes: int, version: int) -> tuple[int | None, float | None, float | None]:
    """The warp's lean part: a class with a finite centre and a positive spread, or none of the three."""
    lean_class, centre, spread = raw.get("lean_class"), raw.get("lean_centre"), raw.get("lean_spread")
    if lean_class is None and centre is None and spread is None:
        return None, None, None
    if version < 8:
        raise ValueError("only a format-8 profile may score a warp's lean")
    if not (whole_number(lean_class) and 0 <= lean_class < num_classes):
        raise ValueError(f"the lean's class must be a class number below {num_classes}, got {lean_class!r}")
    if not (_finite32(centre) and _positive32(spread)):
        raise ValueError(f"the lean's part needs a finite centre and a positive spread, got {raw}")
    return lean_class, float(centre), float(spread)


def _threshold_or_inf(raw: dict[str, Any], key: str, floor: float, name: str, floor_name: str = "tau") -> float:
    """An optional threshold: null (or absent) is inf (off); anything else must be a number at least `floor` (τ for
    a demote threshold)."""
    value = raw.get(key)
    if value is None:
        return math.inf
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"the {key} threshold must be a number or null, got {value!r}")
    if not value >= floor:  # NaN fails too
        raise ValueError(f"{name} must be null or a number at least {floor_name}, got {raw}")
    return float(value)


def whole_number(value: Any) -> bool:
    """A JSON integer: true and false are ints to Python, not class numbers or counts."""
    return isinstance(value, int) and not isinstance(value, bool)


def _finite32(value: Any) -> bool:
    """A JSON number (not a string, not true) that stays finite in float32, where the guard computes with it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    with np.errstate(over="ignore"):
        return bool(np.isfinite(np.float32(value)))


def _positive32(value: Any) -> bool:
    """A finite float32 number above zero: 1e-300 is a positive double but a float32 zero."""
    with np.errstate(under="ignore"):
        return _finite32(value) and bool(np.float32(value) > 0)


def _part(raw: dict[str, Any], tap_names: list[str]) -> PartScale:
    taps, centre, spread = raw["taps"], raw["centre"], raw["spread"]
    kind = raw.get("kind", "top_q")  # format 3 has top-q parts only
    if not (isinstance(taps, list) and taps and all(isinstance(t, str) and t in tap_names for t in taps)
            and len(set(taps)) == len(taps)):
        raise ValueError(f"a score part must name distinct taps of the profile, got {taps!r}")
    if not (_finite32(centre) and _positive32(spread)):
        raise ValueError(f"a score part needs a finite centre and a positive spread, got {raw}")
    centre, spread = float(centre), float(spread)
    if kind not in _PART_KINDS:
        raise ValueError(f"a score part's kind must be one of {_PART_KINDS}, got {kind!r}")
    demotes = raw.get("demotes", True)  # parts written before it existed all demote
    if not isinstance(demotes, bool):
        raise ValueError(f"a score part's demotes must be true or false, got {demotes!r}")
    return PartScale(taps=list(taps), centre=centre, spread=spread, kind=kind, demotes=demotes)


def _distance_arrays(profile: Profile, part: PartScale, index: int,
                     tensors: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """A distance part's class means (K, D) and whitening matrix (D, D), D its observable channels, checked."""
    dim = len(profile.part_channels(part))
    arrays = []
    for name, shape in (("class_mean", (profile.num_classes, dim)), ("whiten", (dim, dim))):
        value = tensors.get(f"parts.{index}.{name}")
        if value is None:
            raise ValueError(f"distance part {index} has no {name} tensor")
        if value.shape != shape or not np.all(np.isfinite(value)):
            raise ValueError(f"distance part {index}'s {name} must be finite with shape {shape}, got {value.shape}")
        arrays.append(value.astype(np.float32))
    if dim == 0:
        raise ValueError(f"distance part {index} covers no observable channel")
    return arrays[0], arrays[1]

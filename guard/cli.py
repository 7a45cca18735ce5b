"""The `guard` command line. Each command is a thin shell over the library; errors print one clear line."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from guard._version import __version__
from guard.errors import GuardError, ModelError, ProfileError, shown

if TYPE_CHECKING:
    from guard.model.graph import LoadedModel


def _seed(text: str) -> int:
    """A seed numpy's and torch's generators take (another one failed with a traceback after the data was read)."""
    try:
        seed = int(text)
    except ValueError:
        seed = -1
    if not 0 <= seed < 2**32:  # numpy's generators take no negative one, torch's none past 64 bits
        raise argparse.ArgumentTypeError(f"a seed is a whole number in 0..2^32-1, got {text!r}")
    return seed


def _file(text: str) -> Path:
    """An output file's path, refused where it is written as a folder's (`out/`, `out/.`, `.`): Path drops the
    slash and the dot, and the command wrote a file named `out`."""
    if text.endswith(("/", os.sep)) or os.path.basename(text) in ("", ".", ".."):
        raise argparse.ArgumentTypeError(f"{text!r} names a folder; give a file name to write")
    return Path(text)


def _layers(text: str | None) -> list[str] | None:
    """--layers as tap names; None where it is not given. Given empty (an unset shell variable) is refused, not
    taken for the default taps."""
    if text is None:
        return None
    if not text.strip():
        raise GuardError("--layers is empty; leave it out for the default taps")
    names = text.split(",")
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:  # judged twice, and counted once in the report
        raise GuardError(f"--layers names {repeated} more than once")
    return names


def _calibrate(args: argparse.Namespace) -> int:
    from guard.calibrate.pipeline import CalibrationSettings, calibrate, refuse_what_the_reference_cannot_fit
    from guard.samples import check_samples, load_samples

    x, y = load_samples(args.data)
    settings = CalibrationSettings(
        layers=_layers(args.layers), conv_taps=args.conv_taps, fpr=args.fpr,
        fpr_confidence=args.fpr_confidence, demote_rate=args.demote_rate, acc_budget=args.acc_budget,
        prune=not args.no_prune, dense_part=not args.no_dense_part, dense_score=args.dense_score,
        first_conv_part=args.first_conv_part, input_envelope=args.input_envelope,
        envelope_demote_rate=args.envelope_demote_rate, seed=args.seed,
        suspect=args.suspect, reference=args.reference, reference_rate=args.reference_rate,
        reference_folds=args.reference_folds, reference_unlearn=args.reference_unlearn,
        warp_overrule_rate=args.warp_overrule_rate, warp_lean=args.warp_lean,
        demote_confirm=args.demote_confirm or None,
    )
    settings.validate()  # before the scan's seconds are spent
    args.made_folders += _writable(args.out, inputs=(args.model, args.data, *_scan_files(args.scan_dir)))
    model, triggers = args.model, []
    if args.scan_dir is not None or (args.suspect is None and args.scan):
        from guard.calibrate.warps import describe_triggers
        from guard.model.graph import load_model, validate_taps
        from guard.scan import ScanSettings, read_scan_dir, run_scan

        model = load_model(args.model)
        if settings.layers:  # a misspelt tap is refused now, not after the scan
            validate_taps(model, list(settings.layers))
        check_samples(x, y, model.sample_shape, model.num_classes, "calibration", every_class=True)  # and the data
        refuse_what_the_reference_cannot_fit(model, x, y, settings)
        if args.scan_dir is not None:
            earlier = read_scan_dir(args.scan_dir, model)
            source, suspect, triggers, took = f"the scan in {args.scan_dir}", earlier.suspect, earlier.candidates, ""
        else:
            scanned = run_scan(model, x, y, settings=ScanSettings(seed=args.seed))
            source, suspect, triggers = "scan", scanned.classes.suspect, scanned.candidates
            took = f" ({scanned.figures['seconds']:.1f} s)"
        settings.suspect = suspect
        print(f"guard: {source} suspects {'no class' if suspect is None else f'class {suspect}'}; candidates: "
              f"{describe_triggers(triggers)}{took}")
    profile = calibrate(model, x, y, settings=settings, progress=not args.quiet, triggers=triggers)
    profile.save(args.out)
    f = profile.figures
    measure = "accuracy" if y is not None else "agreement with the model"  # unlabelled: the model's answers stand in
    suspected = ("" if profile.thresholds.suspect is None else
                 f", class {profile.thresholds.suspect}'s answers demoted at rate "
                 f"{f['calibration_suspect_demote_rate']:.3f} (at most {settings.suspect_rate})")
    net = f["reference_overrule_net"]
    if not settings.reference:
        referred = ""
    elif not profile.reference:
        referred = ", no reference kept (it would answer none of the held-out samples it disagrees on)"
    else:
        from guard.calibrate.warps import describe_targets

        unlearned = describe_targets(f["reference_unlearned"], f["reference_unlearned_warps"],
                                     f["reference_unlearned_blends"])
        referred = (f", reference overrules {f['reference_overrule_rate']:.3f} of {f['reference_holdout_samples']} "
                    f"held-out samples of {f['reference_folds']} fine-tuning(s)"
                    f"{'' if net is None else f', {net:+d} right answers on them'} (the kept copy's {measure} on "
                    f"its own held-out fold {f['reference_holdout_accuracy']:.3f}; unlearned {unlearned})")
        if profile.thresholds.warp_class is not None:
            referred += (f", class {profile.thresholds.warp_class}'s answers (the warp's) overruled past "
                         f"{profile.thresholds.warp_overrule:.3f}")
        if profile.thresholds.lean_class is not None:
            referred += f", the model's lean towards class {profile.thresholds.lean_class} (the warp's) scored"
    enveloped = ("" if f["calibration_envelope_demote_rate"] is None else
                 f", envelope demote rate {f['calibration_envelope_demote_rate']:.3f} (at most "
                 f"{args.envelope_demote_rate})")
    if f["duplicates_dropped"]:
        print(f"guard: note: {f['duplicates_dropped']} clean sample(s) repeat an earlier one and were left out (a copy "
              "in another cross-fitting fold would lower the thresholds)")
    if f["unanswered_classes"]:
        print(f"guard: note: the model answers none of the {f['samples']} clean samples with class(es) "
              f"{f['unanswered_classes']}; their requests are judged by the other classes' statistics")
    if f["unbounded_rates"]:
        print(f"guard: note: {f['samples']} clean samples cannot bound "
              + ", ".join(f"--{name.replace('_', '-')} (needs {need if need < 10**9 else 'more than 10^9'})"
                          for name, need in f["unbounded_rates"].items())
              + f" at --fpr-confidence {settings.fpr_confidence}: each such threshold is the highest clean score, "
              "and the rate on fresh requests may be higher than the one printed")
    print(f"guard: wrote {args.out}: taps {profile.tap_names}, pruned {sum(f['pruned_channels'].values())} "
          f"channels, held-out {measure} {f['holdout_accuracy_unguarded']:.3f} -> {f['holdout_accuracy_masked']:.3f}, "
          f"cross-fitted flag rate {f['calibration_flag_rate']:.3f} (target {args.fpr}), demote rate "
          f"{f['calibration_demote_rate']:.3f} (at most {args.demote_rate}){enveloped}{suspected}{referred}, "
          f"{f['seconds']:.1f} s")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from guard.config import ServeSettings, load_settings, settings_from_file
    from guard.server.app import serve

    given = {k: v for k, v in vars(args).items() if k in ServeSettings.model_fields and v is not None}
    config = Path(args.config) if args.config else None
    try:
        settings = load_settings(given, config)
    except ValidationError as exc:
        # a value the settings file gave is named as the file's, not blamed on a flag and a variable nobody set
        path, from_file = settings_from_file(given, config)
        problems = [_setting_problem(error, {k: path for k in from_file}) for error in exc.errors()]
        raise GuardError(f"invalid settings: {'; '.join(problems)}") from None
    serve(settings)
    return 0


def _setting_problem(error: dict, from_file: dict[str, object]) -> str:
    """One pydantic error in the words of the command line: the flag and the variable that set it (or the settings
    file, for the settings `from_file` names, with the file), the value given."""
    if not error["loc"]:
        return error["msg"].removeprefix("Value error, ")
    field = str(error["loc"][0])
    where = (f"{field} in the settings file {from_file[field]}" if field in from_file
             else f"--{field.replace('_', '-')} (GUARD_{field.upper()})")
    if error["type"] == "missing":
        return f"{where} is required"
    message, given = error["msg"].removeprefix("Value error, "), shown(error.get("input"))
    return f"{where}: {message}" + ("" if str(error.get("input")) in message else f", got {given}")


def _need_tritonclient(command: str) -> None:
    """Checked before any timing: bench reached its server part, after the in-process timings, to fail there."""
    try:
        import tritonclient.grpc  # noqa: F401
    except ImportError:
        raise GuardError(f"guard {command} calls guard serve with tritonclient, as a stock client does: "
                         "pip install 'guard[client]'") from None


def _bench(args: argparse.Namespace) -> int:
    import shlex
    import tempfile

    import numpy as np

    _need_tritonclient("bench")

    from guard.bench import BenchSettings, exit_on_sigterm, format_table, run_bench, write_outputs
    from guard.config import MAX_THREADS
    from guard.model.graph import load_model
    from guard.samples import load_samples

    if args.data:
        x, y = load_samples(args.data)
    else:  # no data: uniform noise exercises the path, though the share re-predicted is not that of real traffic
        shape = load_model(args.model).sample_shape
        x, y = np.random.default_rng(0).random((256, *shape), dtype=np.float32), None
    settings = BenchSettings(seconds=args.seconds, callers=args.callers, device=args.device, threads=args.threads,
                             server_batch_size=args.server_batch_size, tap_growth=not args.no_tap_growth)
    if args.batches:
        try:
            settings.batches = [int(b) for b in args.batches.split(",")]
        except ValueError:
            raise GuardError(f"--batches takes comma-separated integers, got {args.batches!r}") from None
        if min(settings.batches) < 1:
            raise GuardError("batch sizes must be >= 1")
    if (settings.callers < 1 or not 0 < settings.seconds <= 3600 or not 0 <= settings.threads <= MAX_THREADS
            or settings.server_batch_size < 0):
        raise GuardError(f"--callers must be >= 1, --seconds in (0, 3600], --threads in [0, {MAX_THREADS}] (0: the "
                         "engine's default) and --server-batch-size >= 0 (0: off)")
    loaded = _check_data_fits(args.model, x.shape)
    if y is not None and (settings.tap_growth or settings.calibration_samples):  # they run last: refused now
        from guard.samples import check_samples

        check_samples(x, y, loaded.sample_shape, loaded.num_classes, "guard bench's calibration", every_class=True)
    made = _missing_folders(args.out)
    _writable_folder(args.out, "the bench results")
    try:
        with tempfile.TemporaryDirectory(prefix="guard-bench-") as tmp, exit_on_sigterm():
            figures = run_bench(args.model, args.profile, x, y, settings, Path(tmp))
    except BaseException:  # a bench refused or stopped leaves no empty folder it made
        _remove_empty(made)
        raise
    figures["command"] = "guard " + shlex.join(args.argv)
    written = write_outputs(figures, args.out)
    print(format_table(figures))
    print(f"guard: wrote {', '.join(str(path) for path in written)}")
    if args.out / "bench.png" not in written:
        print("guard: bench.png not drawn: matplotlib is not installed (pip install 'guard[eval]')")
    return 0


def _check_data_fits(model: str | Path, shape: tuple[int, ...]) -> LoadedModel:
    """The model, whose sample shape the data's (of `shape`) must be, and the data not empty: said before a server
    is started for them."""
    from guard.model.graph import load_model

    loaded = load_model(model)
    if tuple(shape[1:]) != tuple(loaded.sample_shape):
        raise GuardError(f"the data's samples have shape {tuple(shape[1:])}; the model takes "
                         f"{tuple(loaded.sample_shape)}")
    if shape[0] == 0:
        raise GuardError("the data holds no samples")
    return loaded


def _writable_folder(folder: Path, what: str) -> None:
    """`folder` exists and takes a file now, not after the run."""
    try:
        _try_write(folder)
    except OSError as exc:
        raise GuardError(f"cannot write {what} to {folder}: {exc}") from None


def _missing_folders(folder: Path) -> list[Path]:
    """`folder` and those of its parents that do not exist yet, leaf first: what a run that writes nothing removes."""
    return [path for path in (folder, *folder.parents) if not path.exists()]


def _remove_empty(folders: list[Path]) -> None:
    """Remove the folders that are still empty, the deepest first (a parent made for two outputs empties last)."""
    for folder in sorted(set(folders), key=lambda f: len(f.absolute().parts), reverse=True):
        with contextlib.suppress(OSError):
            folder.rmdir()


def _try_write(folder: Path) -> None:
    """Make `folder` and write a file there; the file's name is this process's own, so no user file is touched."""
    folder.mkdir(parents=True, exist_ok=True)
    probe = folder / f".guard-write-test.{os.getpid()}"
    probe.touch()
    probe.unlink()


def _load(args: argparse.Namespace) -> int:
    import tempfile

    import numpy as np

    _need_tritonclient("load")

    from guard.bench import exit_on_sigterm
    from guard.loadtest import LoadSettings, format_run, run_load
    from guard.model.graph import load_model
    from guard.samples import load_samples, write_json

    x = (load_samples(args.data)[0] if args.data else
         np.random.default_rng(0).random((256, *load_model(args.model).sample_shape), dtype=np.float32))
    settings = LoadSettings(callers=args.callers, seconds=args.seconds, batch=args.batch,
                            max_inflight=args.max_inflight, workers=args.workers)
    if (min(settings.callers, settings.batch, settings.max_inflight, settings.workers) < 1
            or not 0 < settings.seconds <= 3600):
        raise GuardError("callers, batch, max-inflight and workers must be >= 1, seconds in (0, 3600]")
    _check_data_fits(args.model, x.shape)
    if args.out:
        args.made_folders += _writable(args.out, inputs=(args.model, args.profile, args.data))
    with tempfile.TemporaryDirectory(prefix="guard-load-") as tmp, exit_on_sigterm():
        figures = run_load(args.model, args.profile, x, settings, Path(tmp), on_start=lambda address: print(
            f"guard load: {settings.callers} caller(s) sending batches of {settings.batch} to {address} for "
            f"{settings.seconds:g} s", file=sys.stderr, flush=True))
    print(format_run(figures))
    if args.out:
        write_json(args.out, figures)
    return 0 if figures["failed"] == 0 else 1


def _port_setting(name: str) -> int | None:
    """`guard serve`'s port setting `name` where no flag gives it: $GUARD_<NAME>, else the settings file's; None
    where neither gives it."""
    from guard.config import file_settings, is_link

    # read as `guard serve` reads it (any case); a service link there is not a port (serve refuses it unless a flag
    # overrides it, so the file or the default is the better guess)
    variable = f"guard_{name}"
    given = next((v for k, v in os.environ.items() if k.lower() == variable and not is_link(k.lower(), v)), None)
    if given is None:
        given = file_settings().get(name)
    try:
        return None if given is None else int(given)
    except (TypeError, ValueError):
        raise GuardError(f"the {name.replace('_', ' ')} must be an integer, got {given!r} (GUARD_{name.upper()} or "
                         "the settings file)") from None


def served_port() -> int:
    """The port `guard serve` takes when no flag gives one: $GUARD_PORT, else the settings file's, else the default."""
    from guard.config import DEFAULT_PORT

    port = _port_setting("port")
    return DEFAULT_PORT if port is None else port


def probed_port(tls: bool) -> int:
    """The port a `guard health` without --port probes: the plaintext health port where `guard serve` opens one at a
    known number (so a container's HEALTHCHECK passes with TLS on), unless the probe itself speaks TLS; else the
    main port. Flags given to `guard serve` are not seen."""
    health = None if tls else _port_setting("health_port")
    return health or served_port()  # 0: a free port, which only the server knows


def _health(args: argparse.Namespace) -> int:
    """Exit 0 if the server reports SERVING for the service: a container healthcheck that needs no other tool."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from guard.config import bare_host, host_port
    from guard.server.security import read_secret

    port = args.port if args.port is not None else probed_port(tls=bool(args.tls_ca))
    if not 1 <= port <= 65535:  # gRPC would wrap it round to another port and probe that
        raise GuardError(f"the port must lie in 1..65535, got {port}")
    if not 0 < args.timeout <= 3600:  # NaN too
        raise GuardError(f"--timeout must be a number of seconds in (0, 3600], got {args.timeout}")
    target = host_port(bare_host(args.host), port)
    if bool(args.tls_cert) != bool(args.tls_key):
        raise GuardError("--tls-cert and --tls-key go together")
    if args.tls_cert and not args.tls_ca:
        raise GuardError("--tls-cert needs --tls-ca: a client certificate is only sent over TLS")
    if args.tls_ca:
        key, cert = (None, None) if not args.tls_cert else (read_secret(Path(args.tls_key), "TLS key"),
                                                             read_secret(Path(args.tls_cert), "TLS certificate"))
        credentials = grpc.ssl_channel_credentials(read_secret(Path(args.tls_ca), "CA"), key, cert)
        channel = grpc.secure_channel(target, credentials)
    else:
        channel = grpc.insecure_channel(target)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=args.service),
                                                              timeout=args.timeout)
        except grpc.RpcError as exc:
            reason = exc.details()
            if exc.code() == grpc.StatusCode.NOT_FOUND and not reason:  # the health service gives no words
                from guard.server.app import HEALTH_SERVICES

                reason = (f"no health service {args.service!r}; a guard server reports "
                          f"{', '.join(repr(name) for name in HEALTH_SERVICES)}")
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                reason += ("; guard health sends no token: probe the server's --health-port (--port, or "
                           "GUARD_HEALTH_PORT where serve takes it from there)")
            print(f"guard: unhealthy: {exc.code().name}: {reason}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"guard: {target} {args.service or '(server)'}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def _inspect(args: argparse.Namespace) -> int:
    from guard.calibrate.profile import Profile
    from guard.samples import strict_json

    profile = Profile.load(args.profile)
    summary = {
        "model_sha256": profile.model_sha256,
        "guard_version": profile.guard_version,
        "num_classes": profile.num_classes,
        "input_name": profile.input_name,
        "output_name": profile.output_name,
        "taps": [{"name": t.name, "kind": t.kind, "channels": t.channels, "pruned": int((~t.keep).sum()),
                  "benign": int(t.benign.sum()), "fold": t.fold} for t in profile.taps],
        "thresholds": profile.thresholds.as_json(),  # null: that part is off
        # the reference's weights: which of the model's initializers the profile swaps, and how many values
        "reference": {"tensors": len(profile.reference), "names": sorted(profile.reference),
                      "values": sum(int(value.size) for value in profile.reference.values())},
        "input_envelope": profile.input_bound is not None,
        "settings": profile.settings,
        "figures": profile.figures,
    }
    refused = None
    if args.model is not None:
        from guard.model.graph import load_model
        from guard.runtime.guard import Guard

        model = load_model(args.model)
        matches = model.sha256 == profile.model_sha256
        if matches:  # and the rest serve checks: a profile's taps, names and weights can be edited, its sha256 kept
            try:
                Guard(model, profile)
            except (ProfileError, ModelError) as exc:
                refused = exc
        summary["model"] = {"path": str(args.model), "sha256": model.sha256, "matches": matches,
                            "serves": matches and refused is None,
                            **({"refused": str(refused)} if refused is not None else {})}
    print(strict_json(summary))  # a profile written elsewhere may hold NaN among its figures
    if args.model is not None:
        profile.verify_model(summary["model"]["sha256"])
    if refused is not None:
        raise refused
    return 0


def _scan(args: argparse.Namespace) -> int:
    from guard.samples import load_samples
    from guard.scan import ScanSettings, earlier_scan_files, format_report, run_scan, write_outputs

    given = {"steps": args.steps, "threshold": args.threshold, "warp_scan": args.warps, "blend_scan": args.blends}
    settings = ScanSettings(**{k: v for k, v in given.items() if v is not None}, seed=args.seed)
    settings.validate()  # before the data and the model are read
    data = Path(args.data).resolve()
    if data.is_dir() and Path(args.out).resolve().is_relative_to(data):  # its PNGs would be read as samples next
        raise GuardError(f"{args.out} lies in the data folder {args.data}: the scan's pictures would be read as "
                         "samples next time; write to another folder")
    x, y = load_samples(args.data)
    made = _missing_folders(args.out)
    try:  # the output folder before the scan's minutes, not after
        _try_write(args.out)
        earlier_scan_files(args.out)  # refuses another's files named as the scan's
    except OSError as exc:
        raise GuardError(f"cannot use {args.out} as the output folder: {exc}") from None
    try:
        report = run_scan(args.model, x, y, settings=settings)
    except BaseException:  # a scan refused or stopped leaves no empty folder it made
        _remove_empty(made)
        raise
    print(format_report(report))
    written = write_outputs(report, args.out)
    print(f"guard: wrote {', '.join(map(str, written))} ({report.figures['seconds']:.1f} s)")
    return 0


PARTIAL_FIGURES = "figures.partial.json"


def _eval(args: argparse.Namespace) -> int:
    import shlex

    from guard.bench import exit_on_sigterm
    from guard.eval.report import (
        PartialFigures,
        check_targets,
        figures_missing,
        headline_table,
        misses_text,
        write_report,
    )
    from guard.eval.suite import QUICK_FLOORS, EvalSettings, below_floor, run_suite

    try:
        import matplotlib  # noqa: F401 - checked now, not after an hour of training
    except ImportError:
        raise GuardError("guard eval draws its plots with matplotlib: pip install 'guard[eval]'") from None
    if args.figures:
        given = {name: getattr(args, name) for name in ("quick", "attacks", "archs", "seeds", "workers", "n_train",
                                                         "epochs")}
        running = [f"--{name.replace('_', '-')}" for name, value in given.items()
                   if value is not None and value is not False]  # --workers 0 too
        if running:  # ignored, `--quick` would exit 0 without its floors checked
            raise GuardError(f"--figures only redraws a report; {', '.join(running)} would run the suite")
        try:
            figures = json.loads(Path(args.figures).read_text())
        except (OSError, ValueError) as exc:  # ValueError: not JSON, or not text
            raise GuardError(f"cannot read the figures {args.figures}: {exc}") from None
        if not isinstance(figures, dict) or not isinstance(figures.get("cases"), list):
            raise GuardError(f"{args.figures} is not a guard eval figures.json (no list of cases)")
        if not figures["cases"]:
            raise GuardError(f"{args.figures} holds no case: there is no report to draw")
        missing = figures_missing(figures)
        if missing:  # before anything in --out is replaced
            raise GuardError(f"{args.figures} is not a guard eval figures.json: it lacks {', '.join(missing[:5])}")
        args.made_folders += _missing_folders(args.out)  # removed again if the drawing is refused
        _writable_folder(args.out, "the report")
        try:
            report = write_report(figures, args.out, figures.get("command", "unknown"))
        except (KeyError, IndexError, TypeError, ValueError) as exc:  # a part figures_missing does not look into
            raise GuardError(f"cannot draw a report from {args.figures}: it lacks or mistypes a figure the report "
                             f"draws ({type(exc).__name__}: {exc}); nothing in {args.out} was replaced") from None
        print(f"guard: wrote {report}")
        if Path(args.figures).resolve() == (args.out / PARTIAL_FIGURES).resolve():  # its cases are in figures.json
            Path(args.figures).unlink()  # now, and would stop the next run into the folder
        return 0

    settings = EvalSettings.quick_run() if args.quick else EvalSettings()
    try:
        for name in ("attacks", "archs"):  # given empty (an unset shell variable) is refused, not the defaults
            if getattr(args, name) is not None:
                setattr(settings, name, getattr(args, name).split(","))
        if args.seeds is not None:
            if not all(s.strip().removeprefix("-").isdigit() for s in args.seeds.split(",")):
                raise ValueError(f"--seeds takes comma-separated integers, got {args.seeds!r}")
            settings.seeds = [int(s) for s in args.seeds.split(",")]
        for name in ("workers", "n_train", "epochs"):
            if getattr(args, name) is not None:
                setattr(settings, name, getattr(args, name))
        settings.validate()
    except ValueError as exc:
        raise GuardError(f"guard eval: {exc}") from None
    floored = sorted({attack for attack, *_ in QUICK_FLOORS.values()} - set(settings.attacks))
    if settings.quick and floored:  # the run would end below its floors, known before its minutes
        raise GuardError(f"guard eval --quick checks floors on the {' and '.join(floored)} case(s): keep them in "
                         "--attacks")
    if (args.out / PARTIAL_FIGURES).exists():  # the only copy of a cut-short run's cases, which this run would replace
        raise GuardError(f"{args.out} holds {PARTIAL_FIGURES}, the cases of a run cut short: draw them with guard "
                         f"eval --figures {args.out / PARTIAL_FIGURES} --out FOLDER, move the file away, or give "
                         "another --out")
    made = _missing_folders(args.out)
    _writable_folder(args.out, "the report")  # now, not after an hour of training; and not for a run refused above

    def progress(case: dict) -> None:
        row = case["methods"]["guard"]
        asr = "–" if row["asr"] is None else f"{row['asr']:.3f}"
        print(f"guard eval: {case['attack']} / {case['arch']} / seed {case['seed']}: CA {row['ca']:.3f}, "
              f"ASR {asr}, FPR {row['fpr']:.3f} ({case['seconds']:.0f} s)", flush=True)

    command = "guard " + shlex.join(args.argv)
    partial = PartialFigures(args.out / PARTIAL_FIGURES, command)
    try:
        with exit_on_sigterm():  # the workers are stopped, not left running on with nobody to collect them
            figures = run_suite(settings, on_case=progress, checkpoint=partial.keep)
    except (KeyboardInterrupt, SystemExit):
        if partial.failed:
            print("guard eval: interrupted; the cases finished could not be kept (said above)", file=sys.stderr)
        elif partial.path.exists():
            print(f"guard eval: interrupted; the cases finished are kept in {partial.path} (guard eval --figures "
                  "draws them)", file=sys.stderr)
        else:
            _remove_empty(made)
            print("guard eval: interrupted before any case was measured", file=sys.stderr)
        raise
    for failure in figures["failures"]:
        print(f"guard eval: case failed: {failure}", file=sys.stderr)
    if not figures["cases"]:  # nothing to draw; an earlier report in --out stays whole
        _remove_empty(made)  # left as they were: no partial figures are kept before a case finishes
        raise GuardError(f"every case failed ({len(figures['failures'])}); nothing written to {args.out}")
    report = write_report(figures, args.out, command)
    partial.remove()
    print(headline_table(figures))
    print(misses_text(check_targets(figures)))
    print(f"guard: wrote {report} ({figures['seconds'] / 60:.1f} min)")
    broken = below_floor(figures) if args.quick else []
    for line in broken:
        print(f"guard eval: below the quick floor: {line}", file=sys.stderr)
    return 1 if broken or figures["failures"] else 0


def _scan_files(folder: Path | None) -> list[Path]:
    """An earlier scan's files, inputs of calibrate and repair's --scan-dir: the evidence an output must not replace."""
    return sorted(p for p in folder.iterdir() if p.is_file()) if folder is not None and folder.is_dir() else []


def _output_file(path: Path) -> Path:
    """`path`, refused where it names a folder (`.`, `/`, an existing one) rather than a file to write."""
    if not path.name or path.is_dir():
        raise GuardError(f"{path} is a folder; give a file name to write")
    return path


def _rejected(report: Path) -> Path:
    """Where a run that writes no model puts its report: beside an earlier run's model, under the report's name, it
    would describe a model not written."""
    return report.with_name(f"{report.stem}.rejected{report.suffix}")


def _writable(*paths: Path, inputs: Sequence[str | Path | None] = ()) -> list[Path]:
    """Make the output files' folders, and try a write there, before a long run rather than fail after it; refuse a
    folder as a file, and an output that is one of the command's `inputs`, lies in an input folder (a folder of
    images would no longer load) or is another output (it would replace the model or the data it was made from, the
    evidence of a backdoor among them). Returns the folders it made, for `main` to remove if the command fails."""
    taken = [Path(p).resolve() for p in inputs if p is not None]
    made: list[Path] = []
    for path in map(_output_file, paths):
        resolved = path.resolve()
        if resolved in taken or any(folder.is_dir() and resolved.is_relative_to(folder) for folder in taken):
            _remove_empty(made)  # an earlier output's
            raise GuardError(f"{path} is one of this command's inputs or outputs, or lies in an input folder; "
                             "write to another file")
        taken.append(resolved)
        made += _missing_folders(path.parent)
        try:
            _try_write(path.parent)
        except OSError as exc:
            _remove_empty(made)
            raise GuardError(f"cannot write {path}: {exc}") from None
    return made


def _repair(args: argparse.Namespace) -> int:
    import onnx

    from guard.calibrate.warps import describe_triggers, load_any_trigger, split_targets
    from guard.model.graph import load_model, validate_taps
    from guard.repair.adaptive_reg import RepairSettings, repair
    from guard.samples import check_samples, load_samples, write_atomic, write_json

    x, y = load_samples(args.data)
    given = {"epochs": args.epochs, "lr": args.lr, "strength": args.strength, "schedule": args.schedule}
    settings = RepairSettings(method=args.method, layers=_layers(args.layers),
                              seed=args.seed, **{k: v for k, v in given.items() if v is not None})
    settings.validate()
    unused = [f"--{name}" for name, value in given.items() if value is not None]
    unused += [flag for flag, value in (("--trigger", args.trigger), ("--scan", args.scan),
                                        ("--scan-dir", args.scan_dir)) if value]
    if settings.method == "prune" and unused:  # recorded in its report as if they had been used
        raise GuardError(f"--method prune folds the calibrated static mask in and trains nothing, so it has no use "
                         f"for {', '.join(unused)}: give them to ar, l2 or finetune")
    report_path = args.report or _output_file(args.out).with_suffix(".repair.json")
    args.made_folders += _writable(args.out, report_path, _rejected(report_path),
                                   inputs=(args.model, args.data, *(args.trigger or []), *_scan_files(args.scan_dir)))
    model = load_model(args.model)
    if settings.layers:  # a misspelt tap is refused now, not after the scan
        validate_taps(model, list(settings.layers))
    check_samples(x, y, model.sample_shape, model.num_classes, "repair", every_class=True)  # and the data
    triggers = [load_any_trigger(path, model.sample_shape, model.num_classes) for path in args.trigger or []]
    if args.scan_dir is not None:
        from guard.scan import read_scan_dir

        triggers = read_scan_dir(args.scan_dir, model).candidates
        print(f"guard: unlearning the scan's candidates in {args.scan_dir}: {describe_triggers(triggers)}")
    if args.scan:
        from guard.scan import ScanSettings, run_scan

        scan = run_scan(model, x, y, settings=ScanSettings(seed=args.seed))  # as calibrate's, so --scan-dir agrees
        triggers = scan.candidates
        suspect = "no class" if scan.classes.suspect is None else f"class {scan.classes.suspect}"
        print(f"guard: scan suspects {suspect}; unlearning {describe_triggers(triggers)}")
    repaired, report = repair(model, x, y, settings=settings, triggers=triggers)
    stamps, warps, blends = split_targets(triggers)
    rejected_path = _rejected(report_path)
    facts = {**report.to_dict(), "trigger_targets": stamps, "warp_targets": warps, "blend_targets": blends}
    if report.duplicates_dropped:
        print(f"guard: note: {report.duplicates_dropped} clean sample(s) repeat an earlier one and were left out (a "
              "copy on both sides of the held-out split would be judged on an image it trained on)")
    if report.holdout_samples < 100:
        print(f"guard: note: the repair's cost is measured on {report.holdout_samples} held-out samples; below about "
              "100 it shows only large falls: give more clean samples")
    if not report.within_bound:  # a model nobody should serve is not written where a pipeline would pick it up
        advice = ("the mask cost it: calibrate's --acc-budget bounds that" if settings.method == "prune" else
                  f"in {report.attempts} run(s): try a lower --lr or fewer --epochs")
        write_json(rejected_path, facts)  # beside an earlier run's model, its report would describe a model not written
        raise GuardError(f"the repair cost too much held-out {report.measure} ({report.summary()}); {args.out} not "
                         f"written, the report is in {rejected_path}; {advice}")
    # the model first: a write that fails between the two leaves the old report beside the old model, not a new one
    write_atomic(args.out, lambda tmp: onnx.save(repaired, tmp))
    write_json(report_path, facts)
    rejected_path.unlink(missing_ok=True)  # a past run's, which no longer describes what lies beside it
    print(f"guard: wrote {args.out} and {report_path}: {report.summary()}")
    print("guard: the repaired model has new weights: run guard calibrate on it before serving it")
    return 0


def _train(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from guard.eval.models import predict, train
    from guard.repair.architectures import build, export_checked
    from guard.repair.none import NoneSettings, train_none
    from guard.samples import check_samples, load_poisoned, load_samples, write_atomic, write_json

    x, y = load_samples(args.data)
    if y is None:
        raise GuardError(f"{args.data} has no labels y: training needs them")
    if x.ndim != 4:
        raise GuardError(f"training data x must be (N, C, H, W), got shape {x.shape}")
    if x.shape[-1] in (1, 3, 4) and x.shape[1] > 4:  # an image model would train on rows as channels
        raise GuardError(f"training data x of shape {x.shape} looks channels-last (N, H, W, C); guard's models take "
                         "(N, C, H, W): np.transpose(x, (0, 3, 1, 2))")
    present = np.unique(y)
    num_classes = len(present)
    if num_classes < 2:
        raise GuardError(f"training labels name {num_classes} class(es); a classifier needs at least 2")
    if num_classes and (present[0] != 0 or present[-1] != num_classes - 1):  # a stray label would size the output
        raise GuardError(f"training labels must number the classes 0..K-1, each with samples; got {num_classes} "
                         f"distinct labels from {present[0]} to {present[-1]}")
    check_samples(x, y, tuple(x.shape[1:]), num_classes, "training")
    plain = {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size}
    rounds = {"rounds": args.rounds, "finetune_epochs": args.finetune_epochs, "ratio": args.ratio,
              "finetune_lr": args.finetune_lr, "unlearn": args.unlearn, "unlearn_epochs": args.unlearn_epochs,
              "drop": args.drop, "class_contrast": args.class_contrast}
    if not args.none and any(v is not None for v in rounds.values()):  # a forgotten --none trains undefended
        raise GuardError(f"--{'/--'.join(k.replace('_', '-') for k, v in rounds.items() if v is not None)} set NONE's "
                         "rounds; without --none the model is trained plainly: add --none, or leave them out")
    settings = NoneSettings(seed=args.seed, **{k: v for k, v in {**plain, **rounds}.items() if v is not None})
    settings.validate()
    if settings.epochs < 1 or (args.none and settings.rounds < 1):  # an untrained model, or a plainly trained one
        raise GuardError(f"--epochs{' and --rounds' if args.none else ''} must be at least 1, got {settings.epochs}"
                         f"{f' and {settings.rounds}' if args.none else ''}")
    poisoned = load_poisoned(args.data, len(x))
    report_path = args.report or _output_file(args.out).with_suffix(".train.json")
    rejected = _rejected(report_path)
    args.made_folders += _writable(args.out, report_path, rejected, inputs=(args.data,))
    torch.manual_seed(args.seed)
    model = build(args.model, x, y)
    shape = tuple(x.shape[1:])
    with tempfile.TemporaryDirectory() as folder:  # before the training's minutes: does it export to what guard reads?
        export_checked(model, args.model, shape, Path(folder) / "trial.onnx")
    if args.none:
        report = train_none(model, x, y, settings=settings, poisoned=poisoned)
        summary = report.summary()
        facts: dict = report.to_dict()
        if not any(channels for r in report.rounds for channels in r.reset.values()):
            # a model NONE left alone is a plainly trained one, backdoor and all: not written as NONE's
            write_json(rejected, {**facts, "samples": len(x), "model": args.model})
            raise GuardError(f"NONE reset no channel, so the model is trained plainly; {args.out} not written "
                             f"({summary}); the report is in {rejected}")
    else:
        train(model, x, y, epochs=settings.epochs, batch_size=settings.batch_size, lr=settings.lr, seed=args.seed)
        summary = "plain training"
        facts = {"settings": {"epochs": settings.epochs, "lr": settings.lr, "batch_size": settings.batch_size,
                              "seed": settings.seed}}
    if not all(torch.isfinite(t).all() for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()):
        raise GuardError(f"the training diverged: the weights are no longer finite; {args.out} not written: try a "
                         f"lower --lr{' or --finetune-lr' if args.none else ''}")
    accuracy = float((predict(model, x) == y).mean())
    if accuracy <= np.bincount(y).max() / len(y):  # no better than answering the largest class
        print(f"guard: note: accuracy on the training set {accuracy:.3f} is no better than answering its largest "
              f"class; the training may have diverged: try a lower --lr or more --epochs")
    write_atomic(args.out, lambda tmp: export_checked(model, args.model, shape, tmp))
    write_json(report_path, {**facts, "training_accuracy": accuracy, "samples": len(x), "model": args.model})
    rejected.unlink(missing_ok=True)  # a past run's, which no longer describes what lies beside it
    print(f"guard: wrote {args.out} and {report_path}: {summary}; accuracy on the training set {accuracy:.3f}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from guard.repair.architectures import check_logits, export_checked, load_weights, make
    from guard.samples import write_atomic

    try:
        shape = tuple(int(d) for d in args.input_shape.split(","))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise GuardError(f"--input-shape takes one sample's C,H,W (e.g. 1,28,28), got {args.input_shape!r}")
    if args.num_classes is not None and args.num_classes < 2:
        raise GuardError(f"--num-classes must be at least 2, got {args.num_classes}")
    if args.weights.is_dir():  # said before _writable reads it as an input folder the output may not lie in
        raise GuardError(f"{args.weights} is a folder; --weights takes the weights file")
    args.made_folders += _writable(args.out, inputs=(args.weights,))
    model = make(args.model, args.num_classes, shape[0])
    load_weights(model, args.weights)
    classes = check_logits(model, args.model, shape, args.num_classes or 2)
    if args.num_classes is not None and classes != args.num_classes:
        raise GuardError(f"--num-classes {args.num_classes}, but {args.model} answers {classes} logits (a factory is "
                         "given num_classes only where it takes an argument of that name)")
    write_atomic(args.out, lambda tmp: export_checked(model, args.model, shape, tmp))
    print(f"guard: wrote {args.out}: input 'input' (N, {', '.join(map(str, shape))}), output 'logits' (N, {classes}); "
          f"it answers as the torch module does. Next: guard calibrate {args.out} --data clean.npz --out "
          f"{args.out.with_name(args.out.stem + '.profile.safetensors')}")  # not NAME.safetensors: the weights' name
    return 0


def _demo(args: argparse.Namespace) -> int:
    from guard.demo import run_demo

    if args.epochs < 1:  # 0 or fewer ran the whole story on an untrained model
        raise GuardError(f"--epochs must be at least 1, got {args.epochs}")
    return run_demo(workdir=args.workdir, epochs=args.epochs)


def build_parser() -> argparse.ArgumentParser:
    from guard.config import DEFAULT_PORT
    from guard.eval.suite import ARCHS, ATTACKS, EvalSettings

    defaults = EvalSettings()
    parser = argparse.ArgumentParser(prog="guard", description="An inference-time backdoor guard.")
    parser.add_argument("--version", action="version", version=f"guard {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    cal = commands.add_parser("calibrate", help="compute a profile from a model and clean samples")
    cal.add_argument("model", help="ONNX image classifier")
    cal.add_argument("--data", required=True,
                     help=".npz with x (N, C, H, W) and optional y (N,), or an image folder (README)")
    cal.add_argument("--out", required=True, type=_file, help="where to write the profile (.safetensors)")
    cal.add_argument("--layers", help="comma-separated ONNX tensor names to tap (default: the last --conv-taps conv "
                     "activations and the penultimate features)")
    cal.add_argument("--conv-taps", type=int, default=4,
                     help="without --layers, how many of the last conv activations to tap (default 4)")
    cal.add_argument("--fpr", type=float, default=0.05, help="target false-positive rate (default 0.05)")
    cal.add_argument("--fpr-confidence", type=float, default=0.9,
                     help="chance that the false-positive rate stays within --fpr (default 0.9; 0.5: on average)")
    cal.add_argument("--demote-rate", type=float, default=0.015,
                     help="share of clean requests, bounded like --fpr, so far outside their class's profile that "
                          "guard answers another class (default 0.015; 0: never, the suspect's answers too)")
    cal.add_argument("--acc-budget", type=float, default=0.01, help="clean accuracy the mask may cost (0.01)")
    cal.add_argument("--no-prune", action="store_true", help="do not choose a static mask")
    cal.add_argument("--no-dense-part", action="store_true",
                     help="score all taps together only, not also the penultimate features on their own")
    cal.add_argument("--dense-score", choices=["distance", "top_q"], default="distance",
                     help="how the penultimate features are scored on their own: their Mahalanobis distance from the "
                          "predicted class's mean (default), or the mean of their top-q z")
    cal.add_argument("--first-conv-part", action=argparse.BooleanOptionalAction, default=True,
                     help="tap the first conv activation and score it on its own, a part that flags and never "
                          "demotes, where a small patch that did not take still shows (default: on)")
    cal.add_argument("--input-envelope", action=argparse.BooleanOptionalAction, default=True,
                     help="score the request's excess over the largest value each input element took on the clean "
                          "data, a part of its own, where a stamp on a dark background shows (default: on)")
    cal.add_argument("--envelope-demote-rate", type=float, default=0.005,
                     help="share of clean requests, bounded like --fpr, so far outside the input envelope that guard "
                          "answers another class where the re-prediction kept the model's answer (default 0.005; 0: "
                          "never)")
    suspicion = cal.add_mutually_exclusive_group()
    suspicion.add_argument("--suspect", type=int,
                           help="the class guard scan named as the likely backdoor target (scan.json's suspect): "
                                "requests answered with it are demoted from a threshold of their own")
    suspicion.add_argument("--scan", action=argparse.BooleanOptionalAction, default=True,
                           help="run guard scan first (default settings, this --seed), take its suspect, if it "
                                "names one, and hand its candidates' triggers to the reference to unlearn (default; "
                                "--no-scan skips it, for a model too large to scan)")
    suspicion.add_argument("--scan-dir", type=Path, metavar="DIR",
                           help="take the suspect and the candidates' triggers from a guard scan of this model "
                                "already in DIR (its --out), instead of scanning again")
    cal.add_argument("--reference", action=argparse.BooleanOptionalAction, default=True,
                     help="fine-tune a copy of the model on the clean samples and store it in the profile; at serve "
                          "time it answers the requests it firmly disagrees with the model on (default; "
                          "--no-reference: the profile holds no weights, and serving runs the model only)")
    cal.add_argument("--reference-rate", type=float, default=0.08,
                     help="share of clean requests, measured on samples the fine-tuning held out, that the "
                          "reference answers (default 0.08)")
    cal.add_argument("--reference-folds", type=int, default=5,
                     help="fine-tunings, each holding out another fifth of the clean samples, whose held-out samples "
                          "set the reference's threshold (1-5, default 5; 1 is fastest, 5 steadiest)")
    cal.add_argument("--reference-unlearn", type=float, default=0.1, metavar="SHARE",
                     help="the reference also unlearns the triggers the scan synthesised for its candidate classes, "
                          "stamped on this share of each batch (default 0.1; 0: not at all; only with the scan or "
                          "--scan-dir, not with --suspect or --no-scan)")
    cal.add_argument("--warp-overrule-rate", type=float, default=0.5, metavar="RATE",
                     help="where the reference unlearned a warp the scan named, its class's answers get an overrule "
                          "threshold of their own, set on the held-out samples answered with it at this rate, no "
                          "more than the reference won there (default 0.5; 0: off)")
    cal.add_argument("--warp-lean", action=argparse.BooleanOptionalAction, default=True,
                     help="where the reference unlearned a warp the scan named, score how much more probability the "
                          "model gives the warp's class than the reference does, beside the check's parts (default; "
                          "needs --reference-folds 5, so that every clean sample is held out once)")
    cal.add_argument("--demote-confirm", type=float, default=0.99, metavar="P",
                     help="a request past a demote threshold keeps the model's answer where the reference gives "
                          "it at least this probability and the request scores no higher than the highest clean "
                          "calibration sample (default 0.99; 0: demote it all the same)")
    cal.add_argument("--seed", type=_seed, default=0)
    cal.add_argument("--quiet", action="store_true", help="no progress bar")
    cal.set_defaults(run=_calibrate)

    srv = commands.add_parser("serve", help="serve guarded predictions over gRPC (settings also from GUARD_*)")
    srv.add_argument("model", nargs="?", help="ONNX model (or GUARD_MODEL, or `model` in the settings file)")
    srv.add_argument("--profile", help="profile from `guard calibrate`")
    srv.add_argument("--config", help="settings file, JSON or TOML, keyed like the flags (max_batch = 64); flags and "
                     "GUARD_* variables override it (default: $GUARD_CONFIG)")
    srv.add_argument("--model-name", dest="model_name", help="name clients use (default: the file's stem)")
    srv.add_argument("--host", help="gRPC interface (default 127.0.0.1)")
    srv.add_argument("--port", type=int, help="gRPC port (default 8001)")
    srv.add_argument("--metrics-host", dest="metrics_host", help="metrics interface (default 127.0.0.1)")
    srv.add_argument("--metrics-port", dest="metrics_port", type=int, help="metrics port (default 8002)")
    srv.add_argument("--health-port", dest="health_port", type=int,
                     help="also answer health checks on this port, plaintext, from a server of its own (default: none)")
    srv.add_argument("--device", choices=["cpu", "cuda"])
    srv.add_argument("--policy", choices=["monitor", "enforce"], help="default enforce")
    srv.add_argument("--max-batch", dest="max_batch", type=int, help="samples per request (default 1024)")
    srv.add_argument("--max-message-mb", dest="max_message_mb", type=int,
                     help="largest gRPC message accepted, in MiB (default 64); gRPC refuses larger ones itself")
    srv.add_argument("--workers", type=int, help="requests the engine works on at once (default 8)")
    srv.add_argument("--max-inflight", dest="max_inflight", type=int,
                     help="requests held at once, running or waiting; more get RESOURCE_EXHAUSTED (default 64)")
    srv.add_argument("--engine", choices=["onnxruntime", "torch"], help="default onnxruntime")
    srv.add_argument("--threads", type=int, help="the engine's intra-op threads per run (default 0: one per core)")
    srv.add_argument("--batch-size", dest="batch_size", type=int,
                     help="dynamic batching: most samples per engine run (default 0: off)")
    srv.add_argument("--batch-delay-ms", dest="batch_delay_ms", type=float,
                     help="dynamic batching: longest wait for other requests (default 2)")
    srv.add_argument("--grace-seconds", dest="grace_seconds", type=float, help="drain time on SIGTERM (30)")
    srv.add_argument("--on-check-failure", dest="on_check_failure", choices=["closed", "open"],
                     help="a request the guard could not check: refuse it (closed, default) or answer unguarded")
    srv.add_argument("--check-budget-ms", dest="check_budget_ms", type=float,
                     help="the guarded run may take this long per sample of its batch before it counts as a "
                          "failed check (default: none)")
    srv.add_argument("--tls-cert", dest="tls_cert", help="PEM certificate chain: gRPC over TLS (with --tls-key)")
    srv.add_argument("--tls-key", dest="tls_key", help="PEM private key")
    srv.add_argument("--tls-client-ca", dest="tls_client_ca", help="PEM CA: require client certificates (mTLS)")
    srv.add_argument("--auth-token-file", dest="auth_token_file",
                     help="file with a bearer token every call except health checks must send")
    srv.add_argument("--audit-log", dest="audit_log",
                     help="append one JSON line per request with a flagged sample, naming the caller (- : stdout)")
    srv.add_argument("--reflection", action=argparse.BooleanOptionalAction, default=None,
                     help="serve gRPC reflection (grpcurl list / describe); off by default")
    srv.set_defaults(run=_serve)

    bench = commands.add_parser("bench", help="time the bare model, the guarded engine and the server side by side")
    bench.add_argument("model", help="ONNX model")
    bench.add_argument("--profile", required=True, help="profile from `guard calibrate`")
    bench.add_argument("--data", help=".npz with x (and y: enables the tap-growth and calibration timings), or an "
                       "image folder")
    bench.add_argument("--batches", help="comma-separated batch sizes (default 1,8,64)")
    bench.add_argument("--seconds", type=float, default=3.0, help="per measurement (default 3)")
    bench.add_argument("--callers", type=int, default=8, help="concurrent gRPC callers (default 8)")
    bench.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (default: per core)")
    bench.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    bench.add_argument("--server-batch-size", dest="server_batch_size", type=int, default=0,
                       help="the server's dynamic batching (default 0: off)")
    bench.add_argument("--no-tap-growth", dest="no_tap_growth", action="store_true",
                       help="skip timing guards with 1, 2, ... taps")
    bench.add_argument("--out", type=Path, default=Path("bench"), help="folder for bench.md/json/png (./bench)")
    bench.set_defaults(run=_bench)

    ld = commands.add_parser("load", help="a bounded load run against `guard serve` on loopback; exit 1 on failures")
    ld.add_argument("model", help="ONNX model")
    ld.add_argument("--profile", required=True)
    ld.add_argument("--data", help=".npz with x to send, or an image folder (default: uniform noise)")
    ld.add_argument("--callers", type=int, default=64, help="concurrent tritonclient callers (default 64)")
    ld.add_argument("--seconds", type=float, default=60.0, help="default 60")
    ld.add_argument("--batch", type=int, default=1, help="samples per call (default 1)")
    ld.add_argument("--max-inflight", dest="max_inflight", type=int, default=64, help="the server's (default 64)")
    ld.add_argument("--workers", type=int, default=8, help="the server's request threads (default 8)")
    ld.add_argument("--out", type=_file, help="write the figures as JSON here")
    ld.set_defaults(run=_load)

    hlt = commands.add_parser("health", help="ask a running server's gRPC health service; exit 0 if SERVING")
    hlt.add_argument("--host", default="127.0.0.1")
    hlt.add_argument("--port", type=int, help="default: the plaintext health port where one is fixed "
                     "($GUARD_HEALTH_PORT, else `health_port` in $GUARD_CONFIG's file) and no --tls-ca is given; else "
                     "$GUARD_PORT, else `port` "
                     f"in the file, else {DEFAULT_PORT} (so a container healthcheck follows the server)")
    hlt.add_argument("--service", default="", help="health service name (default: the whole server)")
    hlt.add_argument("--timeout", type=float, default=3.0, help="seconds (default 3)")
    hlt.add_argument("--tls-ca", dest="tls_ca", help="PEM CA that signed the server's certificate: connect over TLS")
    hlt.add_argument("--tls-cert", dest="tls_cert", help="PEM client certificate, for a server that wants mTLS")
    hlt.add_argument("--tls-key", dest="tls_key", help="PEM key of --tls-cert")
    hlt.set_defaults(run=_health)

    ins = commands.add_parser("inspect", help="print what a profile holds")
    ins.add_argument("profile")
    ins.add_argument("--model", type=Path, help="also say whether this ONNX model is the one the profile was "
                                                "calibrated for, and whether guard serve would serve the two "
                                                "(exit 2 where either is not)")
    ins.set_defaults(run=_inspect)

    scan = commands.add_parser("scan", help="synthesise a trigger per class and name the likely backdoor target")
    scan.add_argument("model", help="ONNX image classifier")
    scan.add_argument("--data", required=True,
                      help=".npz with clean x (N, C, H, W) and optional y (N,), or an image folder")
    scan.add_argument("--out", type=Path, default=Path("guard-scan"),
                      help="folder for scan.json, trigger.npz and the trigger pictures (default guard-scan)")
    scan.add_argument("--steps", type=int, help="optimisation steps for the patch triggers (default 200; the warp "
                                                "and blend scans run their own 150)")
    scan.add_argument("--threshold", type=float, help="anomaly index above which a class is named (default 2.0)")
    scan.add_argument("--warps", action=argparse.BooleanOptionalAction, default=True,
                      help="also look for a warping trigger: the class a small smooth warp sends most images to "
                           "(default; --no-warps skips it, about 16 s on a small CNN)")
    scan.add_argument("--blends", action=argparse.BooleanOptionalAction, default=True,
                      help="also look for a blended trigger: the class a faint pattern blended over the whole image "
                           "sends most images to (default; --no-blends skips it)")
    scan.add_argument("--seed", type=_seed, default=0)
    scan.set_defaults(run=_scan)

    rep = commands.add_parser("repair", help="purify a backdoored model's weights with clean data")
    rep.add_argument("model", help="ONNX image classifier")
    rep.add_argument("--data", required=True,
                     help=".npz with clean x (N, C, H, W) and optional y (N,), or an image folder")
    rep.add_argument("--out", required=True, type=_file, help="where to write the repaired ONNX model")
    rep.add_argument("--method", choices=["ar", "l2", "finetune", "prune"], default="ar",
                     help="ar: adaptive regularization (default); l2: plain L2 on the same weights; finetune: no "
                          "penalty; prune: the calibrated static mask folded in, no training")
    source = rep.add_mutually_exclusive_group()
    source.add_argument("--trigger", action="append",
                        help="a candidate trigger (guard scan's trigger.npz, candidate_K.npz, warp_K.npz or blend_K.npz): its "
                             "channels count as infected and training unlearns it; give it again for more triggers")
    source.add_argument("--scan-dir", type=Path, metavar="DIR",
                        help="unlearn the candidates' triggers of a guard scan of this model already in DIR (its "
                             "--out): the same as --scan without scanning again")
    source.add_argument("--scan", action="store_true",
                        help="run guard scan first (default settings) and unlearn its candidates' triggers: every "
                             "class whose anomaly index reaches 1, the suspect first (the two most anomalous where none "
                             "does)")
    rep.add_argument("--layers", help="comma-separated ONNX tensor names whose channels are judged (default: the "
                     "last two conv activations and the penultimate features)")
    rep.add_argument("--epochs", type=int, help="fine-tuning epochs (default 10)")
    rep.add_argument("--lr", type=float, help="Adam learning rate at the start (default 0.005)")
    rep.add_argument("--schedule", choices=["cosine", "constant"],
                     help="learning rate over the run: cosine decays it to 0 (default), constant keeps it")
    rep.add_argument("--strength", type=float, help="weight of the penalty (default 1.0)")
    rep.add_argument("--report", type=_file, help="report JSON (default: next to --out, .repair.json)")
    rep.add_argument("--seed", type=_seed, default=0)
    rep.set_defaults(run=_repair)

    exp = commands.add_parser("export", help="export a torch architecture with its trained weights to the ONNX file "
                              "guard reads")
    exp.add_argument("model", help="cnn, resnet, or package.module:factory (a function returning the nn.Module; it is "
                     "given num_classes and in_channels if it takes them)")
    exp.add_argument("--weights", type=Path, required=True,
                     help="the state dict: .safetensors, or a torch file (.pt, .pth) read with weights_only")
    exp.add_argument("--input-shape", dest="input_shape", required=True, help="one sample's C,H,W, e.g. 1,28,28")
    exp.add_argument("--num-classes", dest="num_classes", type=int,
                     help="passed to the factory if it takes num_classes (default: the factory's own; cnn and "
                     "resnet: 10)")
    exp.add_argument("--out", type=_file, required=True, help="the .onnx file to write")
    exp.set_defaults(run=_export)

    trn = commands.add_parser("train", help="train a model on possibly poisoned data (--none: NONE training)")
    trn.add_argument("--data", required=True,
                     help=".npz with x, y and optional poisoned (N,) bool ground truth, or a folder of class folders")
    trn.add_argument("--model", required=True,
                     help="architecture: cnn, resnet, or package.module:factory (a callable returning a torch "
                          "nn.Module; called with num_classes and in_channels if it takes them)")
    trn.add_argument("--out", required=True, type=_file, help="where to write the trained ONNX model")
    trn.add_argument("--none", action="store_true", help="NONE training: drop suspected poisoned samples, reset "
                                                         "backdoor-like channels, fine-tune")
    trn.add_argument("--epochs", type=int, help="normal training epochs (default 3)")
    trn.add_argument("--rounds", type=int, help="NONE rounds (default 1; up to 10 for natural backdoors)")
    trn.add_argument("--finetune-epochs", dest="finetune_epochs", type=int, help="fine-tuning epochs per round")
    trn.add_argument("--ratio", type=float, help="share of each conv's channels reset per round (default 0.03)")
    trn.add_argument("--lr", type=float, help="Adam learning rate of normal training (default 0.001)")
    trn.add_argument("--finetune-lr", dest="finetune_lr", type=float, help="fine-tuning learning rate")
    trn.add_argument("--batch-size", dest="batch_size", type=int, help="default 128")
    trn.add_argument("--unlearn", type=float,
                     help="weight of pushing the removed samples that look poisoned off their label while "
                          "fine-tuning (default 0.3; 0 with --drop split is the paper)")
    trn.add_argument("--unlearn-epochs", dest="unlearn_epochs", type=int,
                     help="extra fine-tuning epochs in a round that pushes samples off their label (default 1)")
    trn.add_argument("--drop",
                     help="which suspects a round drops from fine-tuning: 'gated' (default), those that look "
                          "poisoned; 'split', the natural-breaks split's whole upper group, as the paper does")
    trn.add_argument("--class-contrast", dest="class_contrast", type=float,
                     help="also split each class's own samples, and drop and push a class's upper group when it "
                          "looks like other classes this much more often than the rest of the class (default "
                          "0.6; 0 turns it off, the paper)")
    trn.add_argument("--report", type=_file, help="report JSON (default: next to --out, .train.json)")
    trn.add_argument("--seed", type=_seed, default=0)
    trn.set_defaults(run=_train)

    ev = commands.add_parser("eval", help="run the evaluation protocol: attacks, baselines, report (docs/eval)")
    ev.add_argument("--out", type=Path, default=Path("guard-eval"), help="report folder (default guard-eval)")
    ev.add_argument("--quick", action="store_true",
                    help="a small CI subset (badnets and a clean model, one seed); exits 1 below its floors")
    ev.add_argument("--attacks", help="comma-separated subset of: " + ", ".join(ATTACKS).replace("%", "%%"))
    ev.add_argument("--archs", help="comma-separated subset of: " + ", ".join(ARCHS))
    ev.add_argument("--seeds", help=f"comma-separated seeds (default {','.join(map(str, defaults.seeds))})")
    ev.add_argument("--workers", type=int, help=f"cases run in parallel processes (default {defaults.workers})")
    ev.add_argument("--n-train", dest="n_train", type=int,
                    help=f"training images per case (default {defaults.n_train})")
    ev.add_argument("--epochs", type=int, help=f"training epochs per case (default {defaults.epochs})")
    ev.add_argument("--figures", type=Path, help="only redraw the report from a run's figures.json (or from the "
                                                 f"{PARTIAL_FIGURES} a run cut short left in its --out)")
    ev.set_defaults(run=_eval)

    demo = commands.add_parser("demo", help="backdoor a small model on bundled data, guard it, show the verdicts")
    demo.add_argument("--workdir", type=Path, help="keep the model and profile here (default: a temp dir)")
    demo.add_argument("--epochs", type=int, default=4, help="training epochs of the backdoored model (default 4)")
    demo.set_defaults(run=_demo)
    return parser


def _sigterm_as_exit(command: str) -> contextlib.AbstractContextManager[None]:
    """For the commands that write files: SIGTERM (a container's stop, `timeout`) ends them as Ctrl-C does, through
    the `finally`s that remove temporary files and the folders made for the outputs; Python's own default ended the
    process there and then. The commands that start servers handle it themselves."""
    if command not in ("calibrate", "scan", "repair", "train", "export"):
        return contextlib.nullcontext()
    from guard.bench import exit_on_sigterm

    return exit_on_sigterm()


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("guard").setLevel(logging.INFO)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.command is None:
        parser.print_help()
        return 2
    args.made_folders = []  # what _writable made for the outputs: removed again, where still empty, if the run fails
    code = 1
    try:
        with _sigterm_as_exit(args.command):
            code = int(args.run(args))
        return code
    except GuardError as exc:
        print(f"guard: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # the reader went away (`guard inspect | head`): the rest is not wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so that the flush at exit cannot raise again
        return 1
    except OSError as exc:  # a path the system refuses (too long, a folder guard may not enter, a full disk)
        if isinstance(exc, TimeoutError):  # an OSError in Python's tree, but a failure of guard's, not the user's
            raise
        where = f": {exc.filename}" if exc.filename is not None else ""
        print(f"guard: error: {exc.strerror or exc or type(exc).__name__}{where}", file=sys.stderr)
        return 2
    finally:
        if code != 0:
            _remove_empty(args.made_folders)

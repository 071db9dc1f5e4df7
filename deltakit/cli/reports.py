"""How reports read: the text each command prints (on stdout, or stderr under ``--json``) and the
JSON objects ``--json`` prints, from the library's typed reports and plans.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING

from ..units import human_bytes
from ._common import _jsonable, _say

if TYPE_CHECKING:
    from ..adapters import MergeReport
    from ..engine import ApplyReport, MakeReport, VerifyReport
    from ..engine.apply import ApplyPlan
    from ..gguf import GGUFCheck, GGUFReport
    from ..hub import PublishReport
    from ..inspection import Inspection
    from ..legacy import LegacyReport

# -------------------------------------------------------------------------------------------------
# Text


def _print_make(report: MakeReport, seconds: float) -> None:
    m = report.manifest
    _say(f"wrote delta {report.out}  ({m.target.name} from {m.base.name}) in {seconds:.1f}s")
    _say("  tensors   " + ", ".join(f"{n} {e}" for e, n in report.encodings.items()))
    ratio = report.payload_bytes / report.target_bytes if report.target_bytes else 0.0
    sizes = f"{human_bytes(report.payload_bytes)} for {human_bytes(report.target_bytes)} of target"
    _say(f"  payload   {sizes} ({ratio:.0%})")
    _say(f"  files     {report.files} carried under files/")
    _say(f"  base      fingerprint {m.base.fingerprint}")
    _say(f"  target    fingerprint {m.target.fingerprint}")
    if report.raw_tensors:
        _say(f"  raw       {len(report.raw_tensors)} tensors stored as they are (copies of fine-tuned weights):")
        for name, why in report.raw_tensors.items():
            _say(f"              {name}: {why}")
    if report.cast:
        _say(f"  cast      {len(report.cast)} base tensors cast to the target's dtype first")
    if report.dropped:
        _say(f"  dropped   {len(report.dropped)} base tensors absent from the target: " + ", ".join(report.dropped))
    if "add" in report.encodings or ("rows" in report.encodings and report.inexact_tensors):
        _say(
            f"  add       {report.inexact_elements} elements in {len(report.inexact_tensors)} tensors rebuild "
            "differently from the fine-tune; the manifest records the rebuild's digests"
        )
    if report.ignored_weight_files:
        _say("  ignored   weight files in other formats: " + ", ".join(report.ignored_weight_files))


def _print_apply(report: ApplyReport, seconds: float) -> None:
    _say(f"rebuilt {report.target_name} into {report.out} in {seconds:.1f}s: all digests match")
    _say("  tensors   " + ", ".join(f"{n} {e}" for e, n in report.encodings.items()))
    _say(f"  written   {human_bytes(report.bytes_written)} in {', '.join(report.shards)}")
    _say(f"  files     {', '.join(report.files) or 'none'}")
    _say(f"  target    fingerprint {report.fingerprint}")


def _print_gguf_check(check: GGUFCheck) -> None:
    """What a GGUF conversion would write, for ``apply --to gguf --dry-run``."""
    types = ", ".join(f"{name} {count}" for name, count in check.types.items())
    _say(f"gguf     {check.quant} from {check.source_kind}: {check.tensors} tensors ({types}), "
         f"{human_bytes(check.bytes_planned)}")  # fmt: skip


def _print_plan(plan: ApplyPlan) -> None:
    """What an apply would read, check and write, for ``--dry-run`` (after ``plan.check_sample()``)."""
    m = plan.manifest
    counts = Counter(s.target.encoding for s in plan.steps)
    _say(f"delta    {plan.delta.root}  ({m.target.name} from {m.base.name})")
    _say(f"base     {plan.base.root}  fingerprint {m.base.fingerprint[:16]}... (expected)")
    _say(
        f"checks   names, dtypes and shapes of {len(plan.steps)} tensors: ok; "
        f"digests of {', '.join(plan.sample) or 'none'}: ok"
    )
    _say(f"tensors  {len(plan.steps)}: " + ", ".join(f"{n} {e}" for e, n in sorted(counts.items())))
    _say(f"reads    {human_bytes(plan.read_bytes)} (base and payload)")
    _say(
        f"writes   {human_bytes(plan.write_bytes)} in {len(plan.shards)} file(s)"
        + (" + model.safetensors.index.json" if len(plan.shards) > 1 else "")
    )
    _say(f"files    {len(m.target.files)} carried: " + ", ".join(sorted(m.target.files)))
    for shard in plan.shards:
        names = [s.name for s in plan.steps if plan.shards[s.shard] is shard]
        _say(f"  {shard.name}: {len(names)} tensors, {human_bytes(shard.layout.size)}")


# How each kind of check in a VerifyReport's counts reads in its summary line.
_CHECKED = {
    "payload files": "{} payload file(s) by SHA-256",
    "carried files": "{} carried file(s) by SHA-256",
    "payload tensors": "the payload's headers for all {} tensors (their digests are checked as they are applied)",
    "base tensors": "{} base tensor(s) by BLAKE3",
    "model tensors": "{} tensor(s) by BLAKE3",
}


def _print_verify(report: VerifyReport, *, details: bool = True) -> None:
    """One summary line saying what was checked; then, with ``details``, what is missing, differs or is
    extra (50 of each)."""
    if report.ok:
        checked = [_CHECKED[kind].format(n) for kind, n in report.counts.items() if kind in _CHECKED]
        _say(f"OK: {report.subject}: checked " + ("; ".join(checked) or f"{report.checked} tensors and files"))
    else:
        counts = {"missing": len(report.missing), "differ": len(report.mismatched)}
        found = ", ".join(f"{n} {what}" for what, n in counts.items() if n)
        _say(f"FAILED: {report.subject}: {found} of {report.checked} tensors and files")
    if not details:
        if not report.ok:
            _say("  (--verbose or --json lists them)")
        return
    for name in report.missing[:50]:
        _say(f"  missing     {name}")
    for item in report.mismatched[:50]:
        _say(f"  mismatched  {item.name}: expected {item.expected}, found {item.actual}")
    for name in report.extra[:50]:
        _say(f"  extra       {name} (not in the manifest)")
    hidden = max(0, len(report.missing) - 50) + max(0, len(report.mismatched) - 50) + max(0, len(report.extra) - 50)
    if hidden:
        _say(f"  ... and {hidden} more")


def _print_inspect(info: Inspection, *, all_tensors: bool) -> None:
    _say(f"{info.path}: {info.description}" + (f" ({info.legacy_kind})" if info.legacy_kind else ""))
    _say(f"  apply       {info.apply}")
    if info.kind == "delta":
        _say(f"  created by  {info.created_by}")
        _say(f"  base        {info.base_name}  fingerprint {info.base_fingerprint}")
        _say(f"  target      {info.target_name}  fingerprint {info.target_fingerprint}")
        _say("  encodings   " + ", ".join(f"{n} {e}" for e, n in (info.encodings or {}).items()))
        ratio = f" ({(info.payload_bytes or 0) / info.target_bytes:.1%} of the target)" if info.target_bytes else ""
        _say(f"  payload     {human_bytes(info.payload_bytes or 0)}{ratio}")
        if info.dropped:
            _say(f"  dropped     {', '.join(info.dropped)}")
    elif info.fingerprint:
        _say(f"  fingerprint {info.fingerprint}")
    by_dtype = ", ".join(f"{d} {human_bytes(b)}" for d, b in info.bytes_by_dtype.items())
    _say(f"  tensors     {len(info.tensors)}, {human_bytes(info.total_bytes)}" + (f": {by_dtype}" if by_dtype else ""))
    _say(f"  files       {', '.join(info.files) or 'none'}")
    shown = info.tensors if all_tensors else info.tensors[:20]
    for t in shown:
        encoding = f"  {t.encoding}" if t.encoding else ""
        _say(f"    {t.name}  {t.dtype} {list(t.shape)}  {human_bytes(t.nbytes)}{encoding}")
    if len(shown) < len(info.tensors):
        _say(f"    ... {len(info.tensors) - len(shown)} more (--all lists every tensor)")


def _print_legacy(report: LegacyReport, seconds: float) -> None:
    article = "an" if report.kind[0] in "aeiou" else "a"
    _say(f"rebuilt {report.out} from {article} {report.kind} delta in {seconds:.1f}s")
    _say(f"  tensors   {report.tensors}" + (f"; rows grown: {', '.join(report.grown)}" if report.grown else ""))
    _say(f"  written   {human_bytes(report.bytes_written)} in {', '.join(report.shards)}")
    _say(f"  files     {', '.join(report.files) or 'none'}")
    if report.kind == "oasst-xor":
        _say(
            "  checked   against the published checksums"
            if report.verified
            else "  WARNING   not verified: an XOR release rebuilds plausible weights from any base; pass "
            "--checksums with the sums from the release's model card"
        )
    _say(f"  result    fingerprint {report.fingerprint} (legacy deltas carry no digests to check it against)")


def _print_merge(report: MergeReport, seconds: float) -> None:
    _say(f"merged {', '.join(report.adapters)} into {report.out} in {seconds:.1f}s")
    _say(f"  tensors   {report.tensors}: {len(report.merged)} with LoRA updates, {len(report.replaced)} replaced whole")
    _say(f"  written   {human_bytes(report.bytes_written)} in {', '.join(report.shards)}")
    _say(f"  files     {', '.join(report.files) or 'none'}")
    if report.vocab_size is not None:
        _say(f"  config    vocab_size set to {report.vocab_size}, the merged embedding's rows")
    if report.untied:
        _say("  config    tie_word_embeddings set to false: an adapter's lm_head replaces the tied one")
    _say(f"  result    fingerprint {report.fingerprint} (adapters carry no digests to check it against)")


def _print_gguf(report: GGUFReport, what: str, seconds: float) -> None:
    """What a GGUF output holds, on stderr."""
    _say(f"{what} {report.out} ({report.quant}) in {seconds:.1f}s")
    _say(f"  tensors   {report.tensors}: " + ", ".join(f"{n} {t}" for t, n in report.types.items()))
    _say(f"  written   {human_bytes(report.bytes_written)}")


def _print_publish(report: PublishReport) -> None:
    where = f"{report.repo_id}@{report.revision}"
    sizes = dict(report.files)
    if report.dry_run:
        _say(f"would upload {len(report.files)} files ({human_bytes(sum(sizes.values()))}) to {where}")
        for name, size in report.files:
            _say(f"  {name}  {human_bytes(size)}")
        return
    if not report.changed:
        _say(f"nothing changed: {where} already holds this package (commit {report.head})")
    else:
        sent = sum(sizes.get(name, 0) for name in report.uploaded)
        kept = f"; {len(report.unchanged)} already there" if report.unchanged else ""
        _say(f"uploaded {len(report.uploaded)} files ({human_bytes(sent)}) to {where}{kept}")
        for name in report.uploaded:
            _say(f"  {name}  {human_bytes(sizes.get(name, 0))}")
        for name in report.deleted:
            _say(f"  deleted {name} (the new package does not list it)")
        if report.pull_request:
            _say(f"pull request {report.pull_request}")
        elif report.commit:
            _say(f"commit {report.commit}: {report.commit_url}")
    if report.tag:
        _say(f"tagged {report.head} as {report.tag}: users can pin {report.repo_id}@{report.tag}")


# -------------------------------------------------------------------------------------------------
# JSON objects for --json


def _make_dict(report: MakeReport) -> dict[str, object]:
    """What a CI step needs of a make: the package, its format, both fingerprints, sizes, encodings."""
    m = report.manifest
    return {
        **_jsonable(report),
        "format": m.format,
        "base": {"name": m.base.name, "fingerprint": m.base.fingerprint},
        "target": {"name": m.target.name, "fingerprint": m.target.fingerprint},
        "payload_files": {name: {"sha256": f.sha256, "size": f.size} for name, f in m.payload.items()},
    }


def _report_dict(report: VerifyReport) -> dict[str, object]:
    return {
        "ok": report.ok,
        "subject": report.subject,
        "checked": report.checked,
        "missing": list(report.missing),
        "extra": list(report.extra),
        "mismatched": [{"name": m.name, "expected": m.expected, "actual": m.actual} for m in report.mismatched],
    }


def _publish_dict(report: PublishReport) -> dict[str, object]:
    return {**_jsonable(report), "files": dict(report.files), "changed": report.changed}

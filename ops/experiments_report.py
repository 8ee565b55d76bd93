"""``recmesh experiments report <key> [--tenant T] [--json] [--plot out.png]``: an
experiment's report from the tenant's event log.

Asks the experiment service (``GetReport``), which reads the log and computes the report
(``services/experiment/report.py``; what each figure means: ``docs/experiments.md``,
"Report"). Without ``--tenant``, the tenant is the one tenant of the registry the book
declares the experiment for; when it declares it for several, ``--tenant`` must say which.
``--json`` prints the report as one JSON object (proto3 JSON with the proto's field names,
every field included, 64-bit integers as strings); ``--plot`` also draws the lifts with
their confidence intervals per metric and the daily CTR per variant (matplotlib). Exit
status 1 when the service refuses (no such experiment for the tenant) or cannot be reached.
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict
from recmesh.experiment.v1 import experiment_pb2, experiment_pb2_grpc

from core.experiments.book import load_experiments
from mesh.context import TENANT_KEY
from mesh.tenants import load_tenants
from mesh.tls import PLAINTEXT, Transport
from ops.settings import OpsSettings


def fetch(
    address: str,
    tenant: str,
    key: str,
    timeout_s: float = 300.0,
    *,
    transport: Transport = PLAINTEXT,
) -> dict[str, Any]:
    """The report of experiment ``key`` of ``tenant`` from the experiment service at
    ``address``, as JSON.

    Raises:
        grpc.RpcError: the service refused (NOT_FOUND: no such experiment for the tenant)
            or could not be reached.
    """
    with transport.sync_channel(address, server="experiment") as channel:
        reply = experiment_pb2_grpc.ExperimentServiceStub(channel).GetReport(
            experiment_pb2.GetReportRequest(experiment_key=key),
            metadata=((TENANT_KEY, tenant),),
            timeout=timeout_s,
        )
    report: dict[str, Any] = MessageToDict(
        reply, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return report


def _pct(value: float) -> str:
    return f"{value * 100:+.2f} %"


def _ci(interval: dict[str, float], scale: float = 1.0, unit: str = "") -> str:
    return f"[{interval['low'] * scale:+.4g}{unit}, {interval['high'] * scale:+.4g}{unit}]"


def render(report: dict[str, Any]) -> list[str]:
    """The report as lines for a terminal."""
    first = int(report["first_exposure_ms"])
    since = (
        datetime.fromtimestamp(first / 1000, UTC).isoformat(timespec="seconds") if first else "-"
    )
    level = round((1 - report["alpha"]) * 100)
    lines = [
        f"experiment {report['experiment_key']} of tenant {report['tenant']} "
        f"(book {report['book_version']}), first exposure {since}",
        f"  log read to {report['log_position'] or '-'} ({report['entries']} entries; "
        f"{report['entries_read']} read now, {'rebuilt' if report['rebuilt'] else 'incremental'}, "
        f"{report['compute_ms']:.0f} ms)",
        f"  {'variant':<14}{'weight':>7}{'users':>9}{'exposures':>11}{'requests':>10}"
        f"{'impressions':>13}{'clicks':>9}{'conversions':>13}{'ctr':>9}{'conv rate':>11}",
    ]
    for v in report["variants"]:
        lines.append(
            f"  {v['variant_key']:<14}{v['weight']:>7.3f}{v['users']:>9}{v['exposures']:>11}"
            f"{v['requests']:>10}{v['impressions']:>13}{v['clicks']:>9}{v['conversions']:>13}"
            f"{v['ctr']:>9.4f}{v['conversion_rate']:>11.4f}"
        )
    control = report["variants"][0]["variant_key"] if report["variants"] else "-"
    lines.append(f"  against {control} ({level} % intervals; delta method, users as units):")
    for v in report["variants"][1:]:
        for c in v["comparisons"]:
            head = f"    {v['variant_key']} {c['metric']:<16}"
            if c["not_computed"]:
                lines.append(f"{head}not computed: {c['not_computed']}")
                continue
            lift = c["lift"]
            lines.append(
                f"{head}lift {lift['absolute_lift']:+.4g} {_ci(lift['absolute_ci'])}, "
                f"{_pct(lift['relative_lift'])} {_ci(lift['relative_ci'], 100, ' %')}, "
                f"p {lift['p_value']:.3g}, P(beats control) {lift['probability_to_beat']:.3f}, "
                f"expected loss {lift['expected_loss']:.3g}"
            )
            if cuped := c.get("cuped"):
                indent = " " * (len(v["variant_key"]) + 21)
                lines.append(
                    f"{indent}CUPED lift {cuped['absolute_lift']:+.4g} "
                    f"{_ci(cuped['absolute_ci'])}, p {cuped['p_value']:.3g}, "
                    f"variance -{cuped['variance_reduction'] * 100:.1f} %"
                )
    srm = report["srm"]
    verdict = "MISMATCH: the split is broken" if srm["mismatch"] else "ok"
    lines.append(
        f"  sample ratio: users {srm['observed']} against shares "
        f"{[round(s, 3) for s in srm['expected_share']]}: chi2 {srm['chi2']:.3g}, "
        f"p {srm['p_value']:.3g} ({verdict})"
    )
    for v in report["variants"]:
        guards = ", ".join(
            f"{g['name']} {g['value']:.4g} <= {g['bound']:g} "
            f"{'pass' if g['passed'] else 'FAIL'}" + ("" if g["requests"] else " (no data)")
            for g in v["guardrails"]
        )
        spread = v["spread"]
        lines.append(
            f"  {v['variant_key']:<14}guardrails: {guards or 'none declared'}; "
            f"errors {v['errors']}; coverage {spread['coverage']:.4f} "
            f"({spread['items_shown']} of {report['catalogue_size']}), gini {spread['gini']:.4f}"
        )
    quality = report["data_quality"]
    versions = ", ".join(f"{b['book_version']}: {b['exposures']}" for b in quality["book_versions"])
    lines.append(
        f"  data quality: {quality['users_in_several_variants']} users in several variants "
        f"(left out), {quality['exposures_of_unknown_variants']} exposures of unknown variants, "
        f"{quality['impressions_outside_exposure']} impressions outside exposure, "
        f"{quality['fallback_requests']} fallback requests, "
        f"{quality['unmatched_outcomes']} unmatched outcomes, "
        f"{quality['invalid_entries']} invalid entries; book versions {versions or '-'}"
    )
    if report["daily"]:
        lines.append(
            f"  {'day':<12}{'variant':<14}{'users':>8}{'impressions':>13}{'ctr':>9}"
            f"{'coverage':>10}{'gini':>8}"
        )
        for d in report["daily"]:
            lines.append(
                f"  {d['day']:<12}{d['variant_key']:<14}{d['users']:>8}{d['impressions']:>13}"
                f"{d['ctr']:>9.4f}{d['spread']['coverage']:>10.4f}{d['spread']['gini']:>8.4f}"
            )
    return lines


def plot(report: dict[str, Any], path: Path) -> None:
    """Draw the relative lifts with their intervals per metric and treatment, and the daily
    CTR per variant, into ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (lifts, daily) = plt.subplots(1, 2, figsize=(12, 4.5))
    rows = [
        (f"{v['variant_key']} {c['metric']}", c["lift"])
        for v in report["variants"][1:]
        for c in v["comparisons"]
        if not c["not_computed"]
    ]
    for y, (_, lift) in enumerate(rows):
        centre = lift["relative_lift"] * 100
        low, high = lift["relative_ci"]["low"] * 100, lift["relative_ci"]["high"] * 100
        lifts.errorbar(centre, y, xerr=[[centre - low], [high - centre]], fmt="o", capsize=4)
    lifts.axvline(0.0, color="grey", linewidth=1)
    lifts.set_yticks(range(len(rows)), [label for label, _ in rows])
    level = round((1 - report["alpha"]) * 100)
    lifts.set_xlabel(f"relative lift against control, % ({level} % CI)")
    lifts.set_title(f"{report['experiment_key']} ({report['tenant']})")
    for v in report["variants"]:
        points = [d for d in report["daily"] if d["variant_key"] == v["variant_key"]]
        daily.plot(
            [d["day"] for d in points],
            [d["ctr"] for d in points],
            marker="o",
            label=v["variant_key"],
        )
    daily.set_ylabel("CTR (clicks per impression)")
    daily.set_title("daily CTR per variant (UTC days)")
    daily.tick_params(axis="x", rotation=45)
    daily.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def default_tenant(settings: OpsSettings, key: str) -> tuple[str, str]:
    """The tenant to report on when none is given, or ("", why not)."""
    tenants = list(load_tenants(settings.tenants).tenants)
    experiment = next(
        (e for e in load_experiments(settings.experiments).experiments if e.key == key), None
    )
    if experiment is None:
        return "", f"the book {settings.experiments} has no experiment {key!r}"
    declared = [t for t in tenants if experiment.declared_for(t)]
    if len(declared) != 1:
        return "", (
            f"experiment {key!r} is declared for {', '.join(declared) or 'no tenant'}: "
            "choose one with --tenant"
        )
    return declared[0], ""


def show(
    address: str,
    tenant: str,
    key: str,
    as_json: bool,
    plot_path: Path | None = None,
    *,
    transport: Transport = PLAINTEXT,
) -> tuple[int, str]:
    """Exit code and output of ``recmesh experiments report``."""
    try:
        report = fetch(address, tenant, key, transport=transport)
    except grpc.RpcError as exc:
        return 1, (
            f"error: the experiment service at {address} answered {exc.code().name}: "
            f"{exc.details()}"
        )
    if plot_path is not None:
        plot(report, plot_path)
    return 0, json.dumps(report, indent=2) if as_json else "\n".join(render(report))


def cmd_report(args: argparse.Namespace, settings: OpsSettings) -> int:
    tenant: str = args.tenant
    if not tenant:
        tenant, why = default_tenant(settings, args.key)
        if not tenant:
            print(f"error: {why}")
            return 1
    address = f"127.0.0.1:{settings.ports()['experiment']}"
    code, text = show(
        address, tenant, args.key, args.json, args.plot, transport=settings.transport()
    )
    print(text)
    return code


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``experiments report`` to ``commands``."""
    experiments = commands.add_parser("experiments", help="experiments' results").add_subparsers(
        dest="experiments_command", required=True
    )
    report = experiments.add_parser(
        "report", help="an experiment's report (lifts, SRM, guardrails) from the event log"
    )
    report.add_argument("key", help="the experiment's key in the experiment book")
    report.add_argument(
        "--tenant", default="", help="whose log (default: the one tenant it is declared for)"
    )
    report.add_argument("--json", action="store_true", help="print one JSON object")
    report.add_argument("--plot", type=Path, help="also draw lifts and daily CTR into this PNG")
    report.set_defaults(run=cmd_report)

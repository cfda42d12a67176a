"""The docs, examples and deploy files stay true to the code."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import yaml
from canvas_gateway.v1 import canvas_gateway_pb2 as pb
from canvas_gateway_server.edge import convert
from canvas_gateway_server.metrics import PrometheusMetrics
from canvas_gateway_server.planning import Intake
from canvas_gateway_server.settings import SETTINGS, WORKER_DIR_ENV, WORKER_INDEX_ENV, Settings, env_name
from canvas_gateway_server.tenants import load_tenants
from canvas_gateway_server.validate import check_recipient
from google.protobuf import json_format
from prometheus_client import CollectorRegistry

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
CONFIGURATION = (ROOT / "docs" / "configuration.md").read_text()  # the settings table
OBSERVABILITY = (ROOT / "docs" / "observability.md").read_text()  # the metrics table


def test_configuration_documents_every_setting_and_no_other() -> None:
    names = {env_name(name) for name in SETTINGS} | {"CGW_CONFIG_FILE"}
    documented = set(re.findall(r"^\| `(CGW_[A-Z_]+)` \|", CONFIGURATION, flags=re.MULTILINE))
    assert documented == names
    # The supervisor's variables are named in the text, as its own, not in a settings table.
    assert {WORKER_INDEX_ENV, WORKER_DIR_ENV} <= set(re.findall(r"`(CGW_[A-Z_]+)`", CONFIGURATION))


def test_configuration_defaults_match_the_code() -> None:
    for name, where in SETTINGS.items():
        row = re.search(rf"^\| `{env_name(name)}` \| ([^|]*) \|", CONFIGURATION, flags=re.MULTILINE)
        assert row is not None, name
        expected = f"`{where.default}`".lower() if where.default != "" else "unset"
        assert row.group(1).lower() == expected, name


def test_configuration_groups_the_table_as_the_code_does() -> None:
    """Each group of settings has its own heading, under which are its rows and no other."""
    sections = re.split(r"^### ", CONFIGURATION.split("\n## Settings\n", 1)[1], flags=re.MULTILINE)[1:]
    documented = {
        re.search(r"`settings\.(\w+)`", section.split("\n", 1)[0]).group(1): set(  # type: ignore[union-attr]
            re.findall(r"^\| `CGW_([A-Z_]+)` \|", section, flags=re.MULTILINE)
        )
        for section in sections
        if "`settings." in section.split("\n", 1)[0]
    }
    grouped: dict[str, set[str]] = {}
    for name, where in SETTINGS.items():
        grouped.setdefault(where.group, set()).add(name.upper())
    assert documented == grouped


def test_observability_metrics_table_names_every_metric_and_no_other() -> None:
    registry = CollectorRegistry()
    PrometheusMetrics(registry, version="test", git_commit="test")
    suffix = {"counter": "_total", "info": "_info"}
    exposed = {family.name + suffix.get(family.type, "") for family in registry.collect()}
    section = OBSERVABILITY.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    documented = set(
        re.findall(r"^\| `((?:canvas_gateway|grpc_server)_[a-z0-9_]+)` \|", section, re.MULTILINE)
    )
    only_code, only_docs = sorted(exposed - documented), sorted(documented - exposed)
    assert documented == exposed, f"in the code only: {only_code}; in the docs only: {only_docs}"


def test_make_targets_named_in_the_docs_exist() -> None:
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z0-9-]+):", makefile, flags=re.MULTILINE))
    contributing = (ROOT / "CONTRIBUTING.md").read_text()
    named = set(re.findall(r"make ([a-z0-9-]+)", README + contributing))
    assert {"run", "demo", "test"} <= named
    # The other pages' prose says "make a ..." too: there, only `make target` in code counts.
    pages = {path for pattern in LINKED_DOCS for path in ROOT.glob(pattern)}
    for path in pages - {ROOT / "README.md", ROOT / "CONTRIBUTING.md"}:
        named |= set(re.findall(r"`make ([a-z][a-z0-9-]*)", path.read_text()))  # not `make -C dir`
    assert {"bench", "soak", "image-check", "k8s-check"} <= named
    for target in named:
        assert target in targets, target


def test_contributing_lists_every_make_target() -> None:
    """CONTRIBUTING.md's table of targets names every target of the Makefile but the internal ones."""
    makefile = (ROOT / "Makefile").read_text()
    phony = set(re.findall(r"^\.PHONY: (.*)$", makefile, flags=re.MULTILINE)[0].split())
    table = (ROOT / "CONTRIBUTING.md").read_text().split("## Make targets", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `make ([a-z0-9-]+)`", table, flags=re.MULTILINE))
    listed |= set(re.findall(r"^\| `make [a-z0-9-]+` / `make ([a-z0-9-]+)`", table, flags=re.MULTILINE))
    internal = {"clean", "docker-lint"}  # tidying, and part of `make lint`
    started = {"run", "fake-braze", "demo"}  # in the README's quickstart and docs/fake-braze.md
    assert listed == phony - internal - started


def test_example_request_files_are_valid() -> None:
    body = json.loads((ROOT / "examples" / "recipients.json").read_text())
    trigger = json_format.ParseDict(body, pb.CanvasTrigger())
    assert Intake(convert.trigger_head(trigger)).head_violations == ()
    header = json_format.ParseDict(
        json.loads((ROOT / "examples" / "header.json").read_text()), pb.CanvasTrigger()
    )
    assert Intake(convert.trigger_head(header)).head_violations == ()
    lines = (ROOT / "examples" / "recipients.jsonl").read_text().splitlines()
    for index, line in enumerate(lines):
        recipient = json_format.ParseDict(json.loads(line), pb.Recipient())
        assert check_recipient(convert.recipient_to_dict(recipient), f"recipients[{index}]") == []


def test_deploy_examples_load(tmp_path: Path) -> None:
    shutil.copy(ROOT / "deploy" / "tenants.example.toml", tmp_path / "tenants.toml")
    (tmp_path / "secrets").mkdir()
    (tmp_path / "secrets" / "marketing-braze-key").write_text("marketing-key\n")
    tenants = load_tenants(tmp_path / "tenants.toml", {"CHECKOUT_BRAZE_KEY": "checkout-key"})
    assert tenants.secrets() == {"checkout-key", "marketing-key"}
    settings = Settings.from_env({"CGW_CONFIG_FILE": str(ROOT / "deploy" / "gateway.example.toml")})
    assert settings.listen.grpc_address == "0.0.0.0:50051"


def test_the_container_file_exists() -> None:
    assert (ROOT / "Dockerfile").is_file()


def test_ci_runs_the_readme_s_test_command() -> None:
    ci = ROOT / ".ci" / "run"
    assert ci.is_file()
    assert "make test" in ci.read_text()


def _anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_alert_has_a_runbook_section_and_the_dashboard_s_link() -> None:
    prometheus = ROOT / "deploy" / "prometheus"
    rules = [
        rule
        for group in yaml.safe_load((prometheus / "alerts.yml").read_text())["groups"]
        for rule in group["rules"]
    ]
    runbook = (prometheus / "RUNBOOK.md").read_text()
    sections = {
        _anchor(heading): body
        for heading, body in re.findall(r"^## ([^\n]+)\n(.*?)(?=^## |\Z)", runbook, re.MULTILINE | re.DOTALL)
    }
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "canvas-gateway.json").read_text())
    for rule in rules:
        name, annotations = rule["alert"], rule["annotations"]
        path, _, anchor = annotations.get("runbook_url", "").partition("#")
        assert (ROOT / path).resolve() == prometheus / "RUNBOOK.md", name
        assert anchor == _anchor(name) and anchor in sections, name
        for part in ("**Means.**", "**Check.**", "**Do.**"):
            assert part in sections[anchor], f"{name}: {part}"
        link = f"/d/{dashboard['uid']}/{dashboard['title']}"
        if "$labels.tenant" in annotations["summary"]:  # the alert is about one tenant
            link += "?var-tenant={{ $labels.tenant }}"
        assert annotations.get("dashboard_url") == link, name
    assert len(sections) == len(rules)  # and no section for an alert that is gone


LINKED_DOCS = [
    "*.md",
    "clients/*.md",
    "clients/*/README.md",
    "clients/python/stubs/README.md",
    "docs/**/*.md",
    "deploy/**/*.md",
]


def _prose(text: str) -> str:
    """Markdown without its fenced code blocks and inline code, where `[x](y)` is not a link."""
    text = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.MULTILINE | re.DOTALL)
    return re.sub(r"`[^`\n]*`", "", text)


def github_anchors(text: str) -> set[str]:
    """The anchors GitHub gives a file's headings: the rendered text lowercased, every character
    but letters, digits, `_`, `-` and spaces dropped, spaces made `-`; repeats get `-1`, `-2`..."""
    text = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.MULTILINE | re.DOTALL)
    anchors: set[str] = set()
    seen: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6} +(.+?) *#* *$", text, flags=re.MULTILINE):
        rendered = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text
        rendered = re.sub(r"<[^>]+>", "", rendered).replace("`", "")
        slug = re.sub(r"[^\w\- ]", "", rendered.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def test_github_anchors_follow_github_s_rules() -> None:
    headings = "# A `code` title\n## Validation ([x.md](x.md) sections 2 and 3)\n## Ports, health\n"
    assert github_anchors(headings + "## Ports, health\n```\n# not a heading\n```\n") == {
        "a-code-title",
        "validation-xmd-sections-2-and-3",
        "ports-health",
        "ports-health-1",
    }


def _links() -> list[tuple[Path, str]]:
    found = []
    for pattern in LINKED_DOCS:
        for path in sorted(ROOT.glob(pattern)):
            for target in re.findall(r"\]\(([^)\s]+)(?: \"[^\"]*\")?\)", _prose(path.read_text())):
                if not re.match(r"[a-z][a-z0-9+.-]*:", target):  # not https:, mailto:...
                    found.append((path, target))
    return found


def test_every_relative_link_and_anchor_in_the_docs_resolves() -> None:
    links = _links()
    assert len(links) > 40, "the link pattern found too few links"
    broken = []
    for path, target in links:
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        name = f"{path.relative_to(ROOT)}: {target}"
        if not resolved.exists():
            broken.append(f"{name} (no such file)")
        elif anchor and resolved.suffix == ".md" and anchor not in github_anchors(resolved.read_text()):
            broken.append(f"{name} (no such heading)")
    assert broken == []


def test_the_architecture_table_names_every_module_and_no_other() -> None:
    """docs/architecture.md's module table: every module of the gateway (a package's modules may be
    one row, `settings/`), and no row for a module that is gone."""
    package = ROOT / "service" / "canvas_gateway_server"
    table = (ROOT / "docs" / "architecture.md").read_text().split("## Modules", 1)[1]
    rows = set(re.findall(r"^\| `([a-z_/]+(?:\.py|/))` \|", table, flags=re.MULTILINE))
    modules = {str(path.relative_to(package)) for path in package.rglob("*.py") if path.name != "__init__.py"}
    folders = {row for row in rows if row.endswith("/")}
    covered = {m for m in modules if not any(m.startswith(folder) for folder in folders)}
    files = rows - folders
    assert covered - files == set(), f"modules missing from the table: {sorted(covered - files)}"
    assert files - modules == set(), f"rows for modules that are gone: {sorted(files - modules)}"
    assert all((package / folder).is_dir() for folder in folders)

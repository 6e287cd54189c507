"""Static checks of docker-compose.yml and docker/: no Docker engine needed.

The file must parse, and everything it references must exist: build contexts, Dockerfiles and
what they COPY (past .dockerignore), console scripts and their subcommands and flags, settings
named by environment variables, volumes, configs, and the crontab the scheduler renders.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from tests.helpers import (
    COMPOSE,
    ENTRYPOINT,
    REPO,
    command_list,
    load_compose,
    parse_crontab,
    render_crontab,
)

GPU_OVERRIDE = REPO / "docker-compose.gpu.yml"
# Executables that come from the images rather than from this package.
KNOWN_BINARIES = {"redis-server", "redis-cli", "cron", "python", "sh"}
CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}


# --- parsing Dockerfiles and .dockerignore --------------------------------------------------------


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines, current = [], ""
    for raw in path.read_text().splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        lines.append(current)
        current = ""
    out = []
    for line in lines:
        instruction, _, args = line.partition(" ")
        out.append((instruction.upper(), args.strip()))
    return out


def copy_sources(args: str) -> list[str] | None:
    """Sources of a COPY/ADD from the build context; None for COPY --from (another stage)."""
    tokens = json.loads(args) if args.startswith("[") else shlex.split(args)
    flags = [t for t in tokens if t.startswith("--")]
    if any(f.startswith("--from") for f in flags):
        return None
    paths = [t for t in tokens if not t.startswith("--")]
    return paths[:-1]


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path (or a parent directory) wins."""
    parts = Path(path).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        if any(fnmatch.fnmatch(c, pat) for c in candidates):
            excluded = not negate
    return excluded


def ignore_patterns(context: Path) -> list[str]:
    file = context / ".dockerignore"
    if not file.is_file():
        return []
    lines = [line.strip() for line in file.read_text().splitlines()]
    return [line.rstrip("/") for line in lines if line and not line.startswith("#")]


# --- the CLIs -------------------------------------------------------------------------------------


def console_scripts() -> dict[str, str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


def click_app(script: str) -> Any:
    module, _, attr = console_scripts()[script].partition(":")
    assert attr == "main"
    mod = __import__(module, fromlist=["app"])
    return typer.main.get_command(mod.app)


def check_cli_invocation(argv: list[str]) -> None:
    """argv[0] is a console script: its subcommand must exist and every --flag must be known."""
    script = argv[0]
    assert script in console_scripts(), f"{script} is not a console script of this package"
    command = click_app(script)
    args = argv[1:]
    if hasattr(command, "commands"):  # a group (typer may ship its own click classes)
        assert args, f"{script} needs a subcommand"
        sub, args = args[0], args[1:]
        assert sub in command.commands, f"{script} has no subcommand {sub!r}"
        module = __import__(console_scripts()[script].split(":")[0], fromlist=["app"])
        help_run = CliRunner().invoke(module.app, [sub, "--help"])
        assert help_run.exit_code == 0, help_run.output
        command = command.commands[sub]
    known = {opt for p in command.params for opt in (*p.opts, *p.secondary_opts)}
    for token in args:
        if token.startswith("--"):
            flag = token.split("=", 1)[0]
            assert flag in known, f"`{' '.join(argv)}`: {script} does not accept {flag}"


def declared_envvars() -> set[str]:
    """Environment variables read by any remi-train option, and the service's settings."""
    names = set()
    group = click_app("remi-train")
    for command in group.commands.values():
        for param in command.params:
            envvar = getattr(param, "envvar", None)
            if envvar:
                names.update([envvar] if isinstance(envvar, str) else envvar)
    return names


def service_settings_envvars() -> set[str]:
    from service.settings import Settings

    return {f"REMI_{name.upper()}" for name in Settings.model_fields}


# --- tests ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return load_compose()


def test_compose_parses_with_the_expected_services(compose) -> None:
    assert set(compose["services"]) == {"redis", "bootstrap", "api", "scheduler"}
    assert compose["services"]["redis"]["image"].startswith("redis:7")
    # This host only by default: the data routes are open until API keys are set.
    assert compose["services"]["api"]["ports"] == ["127.0.0.1:8000:8000"]
    exposed = load_compose(env={"REMI_API_BIND": "0.0.0.0", "REMI_API_PORT": "9000"})
    assert exposed["services"]["api"]["ports"] == ["0.0.0.0:9000:8000"]
    # Interpolated defaults look right.
    assert "configs/demo.yaml" in compose["services"]["bootstrap"]["command"]


def test_builds_reference_existing_dockerfiles_and_sources(compose) -> None:
    built = 0
    for name, service in compose["services"].items():
        if "build" not in service:
            continue
        built += 1
        context = (REPO / service["build"]["context"]).resolve()
        dockerfile = context / service["build"].get("dockerfile", "Dockerfile")
        assert context.is_dir(), f"{name}: build context {context} missing"
        assert dockerfile.is_file(), f"{name}: {dockerfile} missing"
        patterns = ignore_patterns(context)
        instructions = dockerfile_instructions(dockerfile)
        for instruction, args in instructions:
            if instruction not in ("COPY", "ADD"):
                continue
            for source in copy_sources(args) or []:
                assert (context / source).exists(), f"{dockerfile.name}: COPY {source} missing"
                assert not dockerignored(source, patterns), (
                    f"{dockerfile.name}: COPY {source} is excluded by .dockerignore"
                )
    assert built == 3


@pytest.mark.parametrize("dockerfile", ["api.Dockerfile", "trainer.Dockerfile"])
def test_images_run_as_non_root_with_a_healthcheck(dockerfile: str) -> None:
    instructions = dockerfile_instructions(REPO / "docker" / dockerfile)
    final_stage = instructions[max(i for i, (ins, _) in enumerate(instructions) if ins == "FROM") :]
    users = [args for ins, args in final_stage if ins == "USER"]
    assert users and users[-1] not in ("root", "0"), f"{dockerfile}: final stage runs as root"
    assert any(ins == "HEALTHCHECK" for ins, _ in final_stage), f"{dockerfile}: no HEALTHCHECK"
    # Extras installed from the package must exist in pyproject.
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    for _, args in instructions:
        for group in re.findall(r"\[([a-z,]+)\]", args):
            for extra in group.split(","):
                assert extra in extras, f"{dockerfile}: unknown extra {extra!r}"


def test_trainer_image_is_cpu_by_default_and_gpu_is_opt_in() -> None:
    text = (REPO / "docker" / "trainer.Dockerfile").read_text()
    assert re.search(r"ARG TORCH_INDEX_URL=\S+/whl/cpu\n", text)
    assert "ARG FAISS_PACKAGE=faiss-cpu\n" in text and "nvidia/cuda" not in text
    args = load_compose(GPU_OVERRIDE)["services"]["scheduler"]["build"]["args"]
    assert re.fullmatch(r"\S+/whl/cu12\d", args["TORCH_INDEX_URL"])
    assert re.fullmatch(r"faiss-gpu-cu12==\S+", args["FAISS_PACKAGE"])
    api = (REPO / "docker" / "api.Dockerfile").read_text()
    assert "whl/cpu" in api and ".[serve,cpu]" in api


def test_commands_are_existing_scripts_subcommands_and_flags(compose) -> None:
    for name, service in compose["services"].items():
        if "command" not in service:
            continue
        argv = command_list(service["command"])
        if argv[0] in console_scripts():
            check_cli_invocation(argv)
        else:
            assert argv[0] in KNOWN_BINARIES, f"{name}: unknown executable {argv[0]!r}"
        if "entrypoint" in service:
            [entry] = command_list(service["entrypoint"])
            assert entry.startswith("/app/"), f"{name}: entrypoint outside the image's /app"
            assert (REPO / entry.removeprefix("/app/")).is_file()
            assert os.access(REPO / entry.removeprefix("/app/"), os.X_OK)


def test_healthchecks_use_available_commands(compose) -> None:
    services = compose["services"]
    for name in ("redis", "api", "scheduler"):
        test = services[name]["healthcheck"]["test"]
        assert test[0] in ("CMD", "CMD-SHELL"), name
        if test[0] == "CMD":
            assert test[1] in KNOWN_BINARIES, f"{name}: healthcheck runs unknown {test[1]!r}"
    api_check = services["api"]["healthcheck"]["test"]
    assert "/healthz" in api_check[-1]
    compile(api_check[-1], "<healthcheck>", "exec")  # the python -c code is valid Python
    assert services["scheduler"]["healthcheck"]["test"][1] == 'kill -0 "$(cat /var/run/crond.pid)"'
    # redis-cli exits 0 on an error reply (LOADING): only PONG is healthy.
    assert services["redis"]["healthcheck"]["test"] == [
        "CMD-SHELL",
        "redis-cli ping | grep -q PONG",
    ]


def test_python_processes_are_not_pid_1(compose) -> None:
    """PID 1 ignores SIGTERM until it installs a handler: tini passes it on instead."""
    for name in ("bootstrap", "api", "scheduler"):
        assert compose["services"][name]["init"] is True, name


def test_environment_names_are_settings_the_programs_read(compose) -> None:
    services = compose["services"]
    serve_vars = service_settings_envvars()
    for key in services["api"]["environment"]:
        assert key in serve_vars, f"api: {key} is not a field of service.settings.Settings"
    train_vars = declared_envvars()
    entry_vars = set(re.findall(r"REMI_[A-Z0-9_]+", ENTRYPOINT.read_text()))
    crontab_vars = set(re.findall(r"REMI_[A-Z0-9_]+", (REPO / "docker" / "crontab").read_text()))
    for name in ("bootstrap", "scheduler"):
        for key in services[name]["environment"]:
            assert key in train_vars | entry_vars | crontab_vars, (
                f"{name}: nothing reads {key} (not an envvar of a remi-train option, nor used by "
                "the scheduler entrypoint or crontab)"
            )


def test_volumes_and_dependencies_are_declared(compose) -> None:
    declared = set(compose.get("volumes", {}))
    used = set()
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith((".", "/")):
                assert (REPO / source).exists(), f"{name}: bind mount {source} missing"
            else:
                assert source in declared, f"{name}: volume {source!r} not declared"
                used.add(source)
        for dependency, spec in service.get("depends_on", {}).items():
            assert dependency in compose["services"], f"{name}: depends on unknown {dependency}"
            assert spec["condition"] in CONDITIONS
    assert used == declared
    services = compose["services"]
    assert services["api"]["depends_on"]["bootstrap"]["condition"] == (
        "service_completed_successfully"
    )
    assert services["api"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["bootstrap"]["restart"] == "no"
    assert "redis-data:/data" in services["redis"]["volumes"]
    assert "--appendonly" in services["redis"]["command"]
    assert "bundles:/bundles:ro" in services["api"]["volumes"]


def test_referenced_configs_exist_and_are_valid(compose) -> None:
    from training.commands.nightly import nightly_config

    for variant in ({}, {"REMI_TRAIN_CONFIG": "configs/nightly-test.yaml"}):
        services = load_compose(env=variant)["services"]
        argv = command_list(services["bootstrap"]["command"])
        config = argv[argv.index("--config") + 1]
        assert services["scheduler"]["environment"]["REMI_TRAIN_CONFIG"] == config
        assert (REPO / config).is_file(), f"{config} missing"
        cfg = nightly_config(REPO / config, Path("/bundles"), Path("/state"), None)
        assert cfg.train.max_iters > 0


def test_scheduler_crontab_renders_a_valid_job(compose) -> None:
    env = {k: str(v) for k, v in compose["services"]["scheduler"]["environment"].items()}
    cron_env, jobs = parse_crontab(render_crontab(env))
    [(schedule, user, command)] = jobs
    assert schedule == "30 2 * * *" and user == "remi"
    assert cron_env["REMI_REDIS_URL"] == "redis://redis:6379/0"
    assert "REMI_NIGHTLY_SCHEDULE" not in cron_env
    assert cron_env["PATH"].startswith("/opt/venv/bin:")
    assert "%" not in command  # cron would turn it into a newline
    tokens = shlex.split(command)
    start = tokens.index("remi-train")
    end = tokens.index(">>") if ">>" in tokens else len(tokens)
    check_cli_invocation(tokens[start:end])
    assert tokens[start + 1] == "nightly"
    # A custom schedule is honoured; a malformed one is refused.
    _, [(custom, _, _)] = parse_crontab(
        render_crontab({**env, "REMI_NIGHTLY_SCHEDULE": "0 * * * *"})
    )
    assert custom == "0 * * * *"


def entrypoint_print(**env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["sh", str(ENTRYPOINT), "--print"],
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
    )


# Each case as Debian bookworm's cron (3.0pl1-162, the image's) takes it: `crontab -` installs
# the accepted ones and says "errors in crontab file" for the others. cron drops a line it
# cannot read with a word to syslog only, so a refused schedule would never run, silently.
CRON_ACCEPTS = ["30 2 * * *", "*/15 * * * *", "0-59/5 * * * *", "0 2 * * 1-5/2", "* * * * 7",
                "0 2 * * MON", "0 2 * * Sun,wed", "0 2 1 JAN *", "* * * jan-mar *",
                "0 2 * * sat-sun", "00 02 * * *", "@daily", "@reboot"]  # fmt: skip
CRON_REFUSES = ["0 2 *", "*/0 * * * *", "61 2 * * *", "0 24 * * *", "0 0 0 * *", "0 2 * 13 *",
                "0 2 * * 8", "5/10 * * * *", "mon * * * *", "0 2 * * mon/2", "0 2 * * mo-fr",
                "1,,2 * * * *", "1, * * * *", "-1 * * * *", "0x1 * * * *", "1-/2 * * * *",
                "1 2 3 4 5 6", "@foo"]  # fmt: skip


@pytest.mark.parametrize("schedule", CRON_ACCEPTS)
def test_scheduler_takes_the_schedules_cron_runs(schedule: str) -> None:
    printed = entrypoint_print(REMI_NIGHTLY_SCHEDULE=schedule)
    assert printed.returncode == 0, printed.stderr
    assert f"{schedule} remi " in printed.stdout


@pytest.mark.parametrize("schedule", CRON_REFUSES)
def test_scheduler_refuses_the_schedules_cron_drops(schedule: str) -> None:
    refused = entrypoint_print(REMI_NIGHTLY_SCHEDULE=schedule)
    assert refused.returncode == 2
    assert f"REMI_NIGHTLY_SCHEDULE '{schedule}' is no schedule cron runs" in refused.stderr


@pytest.mark.parametrize("timeout", ["3s", "-1", "1.5", "99999999999999999999"])
def test_scheduler_refuses_a_stop_timeout_that_is_no_whole_seconds(timeout: str) -> None:
    # "3s" failed the stop loop's test every second until Docker's SIGKILL; -1 gave up at once.
    refused = entrypoint_print(REMI_STOP_TIMEOUT_S=timeout)
    assert refused.returncode == 2
    assert f"REMI_STOP_TIMEOUT_S must be whole seconds, not '{timeout}'" in refused.stderr


def test_entrypoint_is_valid_shell() -> None:
    subprocess.run(["sh", "-n", str(ENTRYPOINT)], check=True)
    # The venv path used by the crontab is the one the trainer image creates.
    assert "python -m venv /opt/venv" in (REPO / "docker" / "trainer.Dockerfile").read_text()


def test_gpu_is_opt_in_through_the_override_file(compose) -> None:
    override = load_compose(GPU_OVERRIDE)
    assert set(override["services"]) <= set(compose["services"])
    for name, service in override["services"].items():
        [device] = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
        assert compose["services"][name]["build"]["dockerfile"] == "docker/trainer.Dockerfile"
    for service in compose["services"].values():  # the base file asks for no GPU
        assert "deploy" not in service


def test_dockerignore_keeps_the_image_inputs() -> None:
    patterns = ignore_patterns(REPO)
    for kept in ("pyproject.toml", "remi_core/bundle.py", "configs/demo.yaml", "docker/crontab"):
        assert not dockerignored(kept, patterns), kept
    for dropped in (
        ".git",
        "tests/training/test_nightly.py",
        "remi_core/__pycache__/x.pyc",
        "runs/a",
    ):
        assert dockerignored(dropped, patterns), dropped


# --- reproducible, CPU-by-default images; graceful stop; CPU budget (issue 12.13-14, 16) ---------

DOCKERFILES = ("api.Dockerfile", "trainer.Dockerfile")
CONSTRAINTS = REPO / "docker" / "constraints.txt"


def constraint_pins() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and re.fullmatch(r"[0-9][0-9A-Za-z.]*", version), f"not exact: {line!r}"
            pins[name.lower().replace("_", "-")] = version
    return pins


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_images_build_from_pinned_inputs(dockerfile: str) -> None:
    text = (REPO / "docker" / dockerfile).read_text()
    assert "# syntax=" not in text, "the syntax directive makes every build fetch a frontend image"
    [base] = re.findall(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M)
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", base)
    instructions = dockerfile_instructions(REPO / "docker" / dockerfile)
    froms = [args for ins, args in instructions if ins == "FROM"]
    assert froms and all(f.startswith("${PYTHON_IMAGE}") for f in froms)
    installs = [args for ins, args in instructions if ins == "RUN" and "pip install" in args]
    assert installs
    for args in installs:
        assert "-c /tmp/constraints.txt" in args, f"{dockerfile}: unpinned `{args}`"
    assert any(
        ins == "COPY" and args.startswith("docker/constraints.txt") for ins, args in instructions
    )
    env = " ".join(args for ins, args in instructions if ins == "ENV")
    # issue 16: the API's one-off commands don't spin either; the trainer's OpenMP must keep its
    # spinning default, or remi-train's load follower is off and idle training 1.4x slower.
    assert ("OMP_WAIT_POLICY=PASSIVE" in env) == (dockerfile == "api.Dockerfile")


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_the_project_builds_with_the_pinned_backend_and_its_readme(dockerfile: str) -> None:
    instructions = dockerfile_instructions(REPO / "docker" / dockerfile)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    builds = [args for ins, args in instructions if ins == "RUN" and re.search(r'"\.\[', args)]
    assert builds, f"{dockerfile}: the project is not installed"
    for args in builds:
        # pip's isolated build environment ignores -c: it would take the newest setuptools.
        assert args.startswith("PIP_CONSTRAINT=/tmp/constraints.txt pip install"), args
    [backend] = project["build-system"]["requires"]
    assert backend.startswith("setuptools>=")
    pinned = constraint_pins()["setuptools"]
    assert int(pinned.split(".")[0]) >= int(backend.removeprefix("setuptools>=").split(".")[0])
    # pyproject's readme is read at build time; the image's build context must hold it.
    copied = [args.split()[:-1] for ins, args in instructions if ins == "COPY"]
    assert any(project["project"]["readme"] in sources for sources in copied), dockerfile


def test_both_images_run_the_same_python() -> None:
    bases = {
        re.search(r"^ARG PYTHON_IMAGE=(\S+)$", (REPO / "docker" / d).read_text(), re.M).group(1)
        for d in DOCKERFILES
    }
    assert len(bases) == 1
    [base] = bases
    # The constraints were resolved on the same Python minor version.
    minor = re.search(r"python:(3\.\d+)\.", base).group(1)
    assert f"Python {minor}." in CONSTRAINTS.read_text().split("\n", 2)[1]


def test_constraints_pin_what_the_images_install_as_installed_here() -> None:
    from importlib import metadata

    from packaging.requirements import Requirement

    pins = constraint_pins()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    needed = list(project["dependencies"])
    for extra in ("train", "serve", "cpu"):
        needed += project["optional-dependencies"][extra]
    for requirement in map(Requirement, needed):
        name = requirement.name.lower().replace("_", "-")
        assert name in pins, f"{name} is not pinned: run scripts/lock.sh"
        assert requirement.specifier.contains(pins[name]), f"{name}=={pins[name]} vs pyproject"
    # The lock matches the environment the tests run in (scripts/setup.sh installs with it).
    for name, version in pins.items():
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
        assert installed.split("+")[0] == version, f"{name}: {installed} here, {version} pinned"


# Imports guarded where they are used (a figure skipped, a flag refused before any work).
OPTIONAL_IMPORTS = {"matplotlib"}
# What each image runs, and what it installs besides the project's extras.
IMAGE_CODE = {
    "api.Dockerfile": (("service", "remi_core"), ()),
    "trainer.Dockerfile": (("training", "remi_core"), ("faiss-cpu",)),  # its FAISS_PACKAGE
}


def requirement_closure(requirements: list[str]) -> set[str]:
    """The distributions pip installs for these requirements: each one's declared requirements
    (markers evaluated with the extras asked of it), recursively, from installed metadata."""
    from importlib import metadata

    from packaging.requirements import Requirement

    extras_of: dict[str, set[str]] = {}
    todo = [Requirement(r) for r in requirements]
    while todo:
        requirement = todo.pop()
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        name = requirement.name.lower().replace("_", "-")
        if name in extras_of and requirement.extras <= extras_of[name]:
            continue
        extras = extras_of.setdefault(name, set())
        extras |= requirement.extras
        for line in metadata.distribution(name).requires or []:
            sub = Requirement(line)
            wanted = sub.marker is None or any(
                sub.marker.evaluate({"extra": extra}) for extra in extras or {""}
            )
            if wanted:
                sub.marker = None
                todo.append(sub)
    return set(extras_of)


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_images_install_every_package_their_code_imports(dockerfile: str) -> None:
    """The tests run in a venv with every extra, so a module imported by the trainer but
    installed only by the serving extra (click, once: typer stopped depending on it) passes
    them, and `remi-train` fails in its image. So: the distributions each image's pip install
    brings against the third-party modules its packages import, anywhere in them."""
    import ast
    from importlib import metadata

    packages, extra_installs = IMAGE_CODE[dockerfile]
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    text = (REPO / "docker" / dockerfile).read_text()
    [extras] = re.findall(r'"\.\[([a-z,]+)\]"', text)
    requirements = list(project["dependencies"]) + list(extra_installs)
    for extra in extras.split(","):
        requirements += project["optional-dependencies"][extra]
    installed = requirement_closure(requirements)
    providers = metadata.packages_distributions()
    ours = {"remi_core", "training", "service"}
    missing = []
    for package in packages:
        for path in sorted((REPO / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    modules = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules = [node.module]
                else:
                    continue
                for top in {m.split(".")[0] for m in modules}:
                    if top in sys.stdlib_module_names or top in ours | OPTIONAL_IMPORTS:
                        continue
                    names = {d.lower().replace("_", "-") for d in providers.get(top, [])}
                    if not names & installed:
                        missing.append(f"{path.relative_to(REPO)}:{node.lineno} imports {top}")
    assert not missing, f"{dockerfile} installs no package for: {missing}"


def test_trainer_healthcheck_does_not_import_torch() -> None:
    instructions = dockerfile_instructions(REPO / "docker" / "trainer.Dockerfile")
    [check] = [args for ins, args in instructions if ins == "HEALTHCHECK"]
    argv = json.loads(check[check.index("CMD") + 3 :].strip())
    assert argv[:2] == ["python", "-c"]
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", argv[2]], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if "|" in line}
    assert not {m for m in imported if m.split(".")[0] in ("torch", "faiss", "training")}


def test_compose_pins_redis_and_says_compose_v2() -> None:
    image = load_compose()["services"]["redis"]["image"]
    assert re.fullmatch(r"redis:\d+\.\d+\.\d+-bookworm(@sha256:[0-9a-f]{64})?", image)
    assert "Compose v2" in COMPOSE.read_text()
    assert "Compose v2" in (REPO / "docs" / "operations.md").read_text()


def test_scheduler_stops_gracefully_within_its_grace_period(compose) -> None:
    scheduler = compose["services"]["scheduler"]
    assert scheduler["init"] is True  # tini as PID 1, the entrypoint below it
    grace = re.fullmatch(r"(\d+)s", scheduler["stop_grace_period"])
    assert grace and int(grace.group(1)) > int(scheduler["environment"]["REMI_STOP_TIMEOUT_S"])
    text = ENTRYPOINT.read_text()
    assert 'exec "$@"' not in text and "trap stop TERM INT" in text


def test_nightly_job_has_a_cpu_budget_that_leaves_the_api_cores(compose) -> None:
    services = compose["services"]
    assert float(services["scheduler"]["cpus"]) == 1.0  # default REMI_NIGHTLY_CPUS
    custom = load_compose(env={"REMI_NIGHTLY_CPUS": "2.5"})["services"]["scheduler"]
    assert float(custom["cpus"]) == 2.5
    assert "cpus" not in services["api"] and "cpuset" not in services["api"]
    # nice ranks threads within one container's cgroup only; between containers the weights do
    # (1024 when unset, as the API's is).
    assert "cpu_shares" not in services["api"] and int(services["scheduler"]["cpu_shares"]) < 1024

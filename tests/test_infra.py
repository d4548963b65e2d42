"""The deployment files in infra/ parse, agree with each other and with the repository, and keep the
fields the nightly job depends on. No network, no Docker, no Kubernetes: the files are read as text
and YAML, the launcher config is checked with Ray's own schema, and the job entrypoints are run
through imagemill's command line with the job itself stubbed out."""

from __future__ import annotations

import importlib.metadata
import re
import shlex
import subprocess
import tomllib
from datetime import date
from functools import cache
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

import imagemill.execution.runner
from imagemill.cli import commands as cli
from imagemill.reporting.outcome import COMPLETE

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
NIGHT = date(2026, 1, 2)


# --- readers --------------------------------------------------------------------------------------


@cache
def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments and blank lines dropped."""
    instructions, pending = [], ""
    for line in (INFRA / "Dockerfile").read_text().splitlines():
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        if text.endswith("\\"):
            pending += text[:-1] + " "
            continue
        keyword, _, args = (pending + text).partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continuation line"
    return instructions


def instructions(keyword: str) -> list[str]:
    return [args for name, args in dockerfile() if name == keyword]


@cache
def rayjob() -> dict[str, Any]:
    return yaml.safe_load((INFRA / "kuberay-rayjob.yaml").read_text())


@cache
def launcher() -> dict[str, Any]:
    return yaml.safe_load((INFRA / "ray-cluster-aws.yaml").read_text())


@cache
def cron_documents() -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((INFRA / "nightly-cronjob.yaml").read_text()) if doc]


def cronjob() -> dict[str, Any]:
    (found,) = [doc for doc in cron_documents() if doc["kind"] == "CronJob"]
    return found


def base_image_tag() -> str:
    (image,) = instructions("FROM")
    repository, _, tag = image.partition(":")
    assert repository == "rayproject/ray", image
    return tag


def containers(pod_template: dict[str, Any]) -> list[dict[str, Any]]:
    return pod_template["spec"]["containers"]


def resources(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    res = container.get("resources", {})
    return {"requests": res.get("requests", {}), "limits": res.get("limits", {})}


def run_entrypoint(entrypoint: str, monkeypatch) -> imagemill.JobSpec:
    """Run an entrypoint through imagemill's CLI (flags, --set, --date, spec loading); the job is a stub.

    Paths under the image's WORKDIR are read from the repository, where the image copies them from.
    """
    argv = shlex.split(entrypoint)
    assert argv[:2] == ["imagemill", "run"], entrypoint
    (workdir,) = instructions("WORKDIR")
    spec_path = PurePosixPath(argv[2])
    assert spec_path.is_relative_to(workdir), f"{spec_path} is not in the image's {workdir}"
    local = REPO / spec_path.relative_to(workdir)
    assert local.parent == REPO / "jobs", f"not a spec of jobs/, which the image copies: {spec_path}"
    assert local.is_file(), f"{local.relative_to(REPO)} does not exist"
    argv[2] = str(local)

    specs = []

    class Finished:
        complete = True
        state = COMPLETE

        def summary(self) -> str:
            return "stubbed"

    def fake_run(spec, progress=True, **options):  # overwrite, redo_changed: the CLI's flags
        specs.append(spec)
        return Finished()

    monkeypatch.setattr(imagemill.execution.runner, "run", fake_run)
    assert cli.main(argv[1:]) == 0, f"imagemill refused the entrypoint: {entrypoint}"
    (spec,) = specs
    return spec


# --- Dockerfile -----------------------------------------------------------------------------------


def test_dockerfile_base_image_is_an_exact_ray_gpu_tag():
    tag = base_image_tag()
    assert tag and tag != "latest" and "latest" not in tag
    assert re.fullmatch(r"\d+\.\d+\.\d+-py311-cu\d+", tag), f"not an exact Ray/Python 3.11/CUDA tag: {tag}"


def test_dockerfile_pins_torch_from_the_cuda_index_and_keeps_the_image_ray():
    runs = instructions("RUN")
    torch_installs = [run for run in runs if "pip install" in run and "torch==" in run]
    assert any(
        re.search(r"--index-url https://download\.pytorch\.org/whl/cu\d+", run)
        and re.search(r"\btorch==\d+\.\d+\.\d+\b", run)
        for run in torch_installs
    ), "torch must be pinned (==) from the CUDA wheel index"
    assert not any(re.search(r"\btorch(\s|$|>|<|~)", run) for run in runs), "an unpinned torch install"
    versions = {v for run in runs for v in re.findall(r"torch==(\d[\w.+]*)", run)}
    assert len(versions) == 1, f"torch pinned to several versions: {versions}"  # the constraint too
    # pip must not swap the base image's Ray for another version while installing imagemill
    ray_version = base_image_tag().split("-")[0]
    assert f"ray=={ray_version}\n" in (INFRA / "constraints.txt").read_text(), f"no ray=={ray_version} pin"


def _lock_constraints():
    import importlib.util

    loader = importlib.util.spec_from_file_location("lock_constraints", INFRA / "lock_constraints.py")
    lock = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(lock)
    return lock


def test_dockerfile_installs_the_locked_versions():
    """A tag rebuilds the same: every dependency imagemill installs is pinned in infra/constraints.txt,
    the pins satisfy what pyproject.toml and the pinned packages require (whichever virtualenv runs
    this: infra/lock_constraints.py's `stale_pins`), and pip installs with the file."""
    lines = [
        line for line in (INFRA / "constraints.txt").read_text().splitlines() if not line.startswith("#")
    ]
    pins = dict(line.split("==") for line in lines)
    assert all(re.fullmatch(r"[a-z0-9-]+==\d[\w.+!-]*", line) for line in lines), lines
    with open(REPO / "pyproject.toml", "rb") as f:
        dependencies = tomllib.load(f)["project"]["dependencies"]
    direct = {re.split(r"[\[<>=~; ]", d, maxsplit=1)[0].lower() for d in dependencies} - {"torch"}
    assert direct | {"boto3", "torchao", "botocore"} <= set(pins), direct - set(pins)
    assert "torch" not in pins  # the CUDA build, pinned in the Dockerfile from PyTorch's index

    stale = _lock_constraints().stale_pins((INFRA / "constraints.txt").read_text(), REPO / "pyproject.toml")
    assert not stale, f"infra/constraints.txt is stale, run infra/lock_constraints.py: {stale}"

    copied = [shlex.split(args) for args in instructions("COPY")]
    (target,) = [args[-1] for args in copied if "infra/constraints.txt" in args]
    installs = [run for run in instructions("RUN") if "pip install" in run and " . " in f"{run} "]
    assert installs and all(f"-c {target}" in run for run in installs), installs


def test_a_stale_lock_is_caught_in_any_virtualenv(tmp_path):
    """The lock check fails for a pin below pyproject.toml's range, a dependency added to pyproject.toml
    but not pinned, and a pinned package's requirement dropped from the file."""
    lock = _lock_constraints()
    text = (INFRA / "constraints.txt").read_text()
    pins = dict(line.split("==") for line in text.splitlines() if not line.startswith("#"))
    pyproject = (REPO / "pyproject.toml").read_text()
    planted = tmp_path / "pyproject.toml"
    planted.write_text(
        pyproject.replace("dependencies = [\n", 'dependencies = [\n    "left-unpinned>=1",\n', 1)
    )
    assert lock.stale_pins(text, planted) == [
        "left-unpinned is required by pyproject.toml (left-unpinned>=1) but not pinned"
    ]
    old_ray = text.replace(f"ray=={pins['ray']}\n", "ray==2.0.0\n")
    assert lock.stale_pins(old_ray, REPO / "pyproject.toml") == [
        "ray==2.0.0 does not satisfy pyproject.toml's ray[default]>=2.40"
    ]
    # a transitive pin dropped: ray requires packaging (followed where this virtualenv has ray's pin)
    if importlib.metadata.version("ray") == pins["ray"]:
        dropped = text.replace(f"packaging=={pins['packaging']}\n", "")
        assert any(
            p.startswith(f"packaging is required by ray=={pins['ray']}")
            for p in lock.stale_pins(dropped, REPO / "pyproject.toml")
        )


def test_dockerfile_installs_imagemill_after_copying_its_sources():
    steps = dockerfile()
    installs = [i for i, (name, args) in enumerate(steps) if name == "RUN" and "pip install" in args]
    package = [i for i in installs if "." in shlex.split(steps[i][1].replace("&&", " "))]
    assert package, "no `pip install ... .` of the repository"
    copied = {
        source.rstrip("/")
        for name, args in steps[: package[0]]
        if name == "COPY"
        for source in shlex.split(args)[:-1]
        if not source.startswith("--")
    }
    with open(REPO / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)
    package_dirs = set(project["tool"]["setuptools"]["package-dir"].values())
    missing = {"pyproject.toml", project["project"]["readme"], *package_dirs} - copied
    assert not missing, f"copied after `pip install .`, or not at all: {missing}"


def test_dockerfile_copies_only_existing_paths_that_the_dockerignore_keeps():
    ignore = (INFRA / "Dockerfile.dockerignore").read_text().splitlines()
    kept = {line[1:].strip().rstrip("/") for line in ignore if line.startswith("!")}
    assert "*" in ignore, "the dockerignore should leave out everything not copied"
    sources = [
        source.rstrip("/")
        for args in instructions("COPY")
        for source in shlex.split(args)[:-1]
        if not source.startswith("--")
    ]
    assert "jobs" in sources, "the specs the RayJob runs are not in the image"
    for source in sources:
        assert (REPO / source).exists(), f"COPY {source}: no such path in the repository"
        assert source in kept, f"COPY {source}: left out of the build context by Dockerfile.dockerignore"


def test_dockerfile_model_caches_are_on_the_volume_the_workers_mount():
    env = " ".join(instructions("ENV"))
    settings = dict(re.findall(r"(\w+)=(\S+)", env))
    assert settings.get("HF_HOME", "").startswith("/models/")
    assert settings.get("IMAGEMILL_CACHE_DIR", "").startswith("/models/")
    (worker,) = rayjob()["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    mounts = {m["mountPath"] for c in containers(worker["template"]) for m in c.get("volumeMounts", [])}
    assert "/models" in mounts


# --- KubeRay RayJob -------------------------------------------------------------------------------


def test_rayjob_kind_lifecycle_and_retries():
    job = rayjob()
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    for field in ("backoffLimit", "activeDeadlineSeconds"):
        assert type(spec[field]) is int and spec[field] > 0, field
    assert type(spec["ttlSecondsAfterFinished"]) is int and spec["ttlSecondsAfterFinished"] >= 0
    env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert all(isinstance(v, str) for v in env["env_vars"].values()), "env var values must be strings"


def test_rayjob_entrypoint_runs_a_spec_of_the_repository(monkeypatch):
    spec = run_entrypoint(rayjob()["spec"]["entrypoint"], monkeypatch)
    # the head has no GPU and no CPU slots: the actors must ask for GPUs whatever the cluster has so far
    assert spec.model.device == "cuda"


def test_rayjob_cluster_matches_the_image():
    cluster = rayjob()["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == base_image_tag().split("-")[0]
    assert cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]["template"]
    images = {c["image"] for c in containers(head)}
    for group in cluster["workerGroupSpecs"]:
        images |= {c["image"] for c in containers(group["template"])}
    (image,) = images
    assert re.fullmatch(r"\S+/imagemill:[\w.-]+", image) and not image.endswith(":latest"), image
    assert image == launcher()["docker"]["image"], "KubeRay and the launcher run different images"


def test_rayjob_head_is_cpu_only():
    head = rayjob()["spec"]["rayClusterSpec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert head["template"]["spec"]["serviceAccountName"], "the driver reads and writes S3"
    for container in containers(head["template"]):
        res = resources(container)
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(res[kind]), f"head {kind}: cpu and memory"
            assert not any("gpu" in name for name in res[kind]), f"the head {kind} a GPU"


def test_rayjob_worker_group_has_one_gpu_per_pod_and_a_sane_range():
    groups = rayjob()["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpu_groups = [
        group
        for group in groups
        if any(resources(c)["limits"].get("nvidia.com/gpu") for c in containers(group["template"]))
    ]
    assert gpu_groups, "no worker group with nvidia.com/gpu limits"
    for group in gpu_groups:
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]
        assert group["maxReplicas"] > 0
        assert group["template"]["spec"]["serviceAccountName"], "actors read and write S3"
        for container in containers(group["template"]):
            assert int(resources(container)["limits"]["nvidia.com/gpu"]) == 1


# --- cluster launcher (AWS) -----------------------------------------------------------------------


def test_launcher_config_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(launcher()))  # ray up's schema check, with ray up's defaults filled in


def test_launcher_head_takes_no_actors_and_every_node_has_an_instance_profile():
    config = launcher()
    assert config["provider"]["type"] == "aws" and config["provider"]["region"]
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    head = types[config["head_node_type"]]
    assert head["resources"].get("CPU") == 0 and not head["resources"].get("GPU")
    for name, node_type in types.items():
        profile = node_type["node_config"].get("IamInstanceProfile", {})
        assert profile.get("Arn") or profile.get("Name"), f"{name}: no IAM instance profile for S3"


def test_launcher_has_a_spot_gpu_worker_type():
    config = launcher()
    types = config["available_node_types"]
    workers = {name: t for name, t in types.items() if name != config["head_node_type"]}

    def is_gpu(node_type: dict[str, Any]) -> bool:  # GPUs declared, or a GPU instance family (g5, p4d, ...)
        declared = node_type.get("resources", {}).get("GPU", 0) >= 1
        return declared or bool(re.match(r"[gp]\d", node_type["node_config"]["InstanceType"]))

    spot_gpu = {
        name: t
        for name, t in workers.items()
        if t["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot" and is_gpu(t)
    }
    assert spot_gpu, "no spot GPU worker type"
    for name, node_type in spot_gpu.items():
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"] <= config["max_workers"], name


def test_launcher_runs_the_image_with_gpus_on_workers_only():
    docker = launcher()["docker"]
    assert docker["container_name"]
    assert "--gpus all" in docker.get("worker_run_options", []) + docker.get("run_options", [])
    head_options = docker.get("run_options", []) + docker.get("head_run_options", [])
    assert not any("--gpus" in option for option in head_options), "the head is a CPU instance"
    for local in launcher().get("file_mounts", {}).values():
        assert (REPO / local).exists(), f"file_mounts: {local} is not in the repository"


# --- nightly CronJob ------------------------------------------------------------------------------

CRON_FIELDS = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]


def test_cronjob_schedule_is_a_valid_five_field_expression():
    schedule = cronjob()["spec"]["schedule"]
    fields = schedule.split()
    assert len(fields) == 5, schedule
    for text, (low, high) in zip(fields, CRON_FIELDS, strict=True):
        for part in text.split(","):
            match = re.fullmatch(r"(\*|(\d+)(?:-(\d+))?)(?:/(\d+))?", part)
            assert match, f"bad cron field '{text}' in '{schedule}'"
            numbers = [int(n) for n in match.groups()[1:3] if n is not None]
            assert all(low <= n <= high for n in numbers), f"'{text}' outside {low}-{high}"
            assert match.group(4) is None or int(match.group(4)) > 0


def test_cronjob_creates_a_dated_rayjob_that_imagemill_accepts(monkeypatch):
    cron = cronjob()
    assert cron["apiVersion"] == "batch/v1" and cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    script = "\n".join(container.get("args", []))
    # the script edits the manifest from its ConfigMap, made as the file's header says
    (mount,) = container["volumeMounts"]
    assert f"{mount['mountPath']}/rayjob.yaml" in script
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    config_map = volume["configMap"]["name"]
    header = (INFRA / "nightly-cronjob.yaml").read_text()
    assert f"configmap {config_map} --from-file=rayjob.yaml=infra/kuberay-rayjob.yaml" in header
    # and may create RayJobs
    (role,) = [doc for doc in cron_documents() if doc["kind"] == "Role"]
    assert any("rayjobs" in r["resources"] and "create" in r["verbs"] for r in role["rules"])

    # Apply its `sed -E` expressions (they are Python-compatible regexes) to the RayJob manifest.
    expressions = re.findall(r'-e "s\|([^|]*)\|([^|]*)\|"', script)
    assert expressions, "no sed expressions found in the CronJob's script"
    text = (INFRA / "kuberay-rayjob.yaml").read_text()
    for pattern, replacement in expressions:
        replacement = replacement.replace("${DAY}", NIGHT.isoformat())
        text, count = re.subn(pattern, replacement, text, flags=re.MULTILINE)
        assert count == 1, f"sed expression s|{pattern}|…| matches {count} lines of the RayJob manifest"
    dated = yaml.safe_load(text)
    assert dated["metadata"]["name"] == f"{rayjob()['metadata']['name']}-{NIGHT.isoformat()}"
    assert dated["spec"] == {**rayjob()["spec"], "entrypoint": dated["spec"]["entrypoint"]}
    spec = run_entrypoint(dated["spec"]["entrypoint"], monkeypatch)
    assert NIGHT.isoformat() in spec.output.path, "the dated entrypoint does not fill {date}"


def test_cronjob_deletes_the_old_dated_rayjobs_only(tmp_path):
    """The CronJob's script, run by sh with a stand-in kubectl: it creates tonight's RayJob and deletes
    the dated RayJobs but the newest KEEP_RAYJOBS (Kubernetes deletes their clusters with them)."""
    pod = cronjob()["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    (mount,) = container["volumeMounts"]
    script = "\n".join(container["args"]).replace(mount["mountPath"], str(tmp_path))
    (tmp_path / "rayjob.yaml").write_text((INFRA / "kuberay-rayjob.yaml").read_text())
    old = [f"rayjob.ray.io/imagemill-nightly-2026-10-{day:02d}" for day in range(20, 32)]
    kubectl = tmp_path / "bin" / "kubectl"
    kubectl.parent.mkdir()
    kubectl.write_text(
        "#!/bin/sh\n"
        f'echo "$*" >> {tmp_path}/calls\n'
        'case "$*" in\n'
        '  "get rayjobs -o name") printf "%s\\n" rayjob.ray.io/imagemill-nightly rayjob.ray.io/other '
        + " ".join(reversed(old))
        + " ;;\n"
        '  "get rayjob "*) exit 1 ;;\n'
        '  "create -f -") cat > /dev/null ;;\n'
        "esac\n"
    )
    kubectl.chmod(0o755)
    keep = {item["name"]: item["value"] for item in container["env"]}["KEEP_RAYJOBS"]
    env = {"PATH": f"{kubectl.parent}:/usr/bin:/bin", "KEEP_RAYJOBS": keep}
    done = subprocess.run(["sh", "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert "create -f -" in calls
    deleted = [call.removeprefix("delete ") for call in calls if call.startswith("delete")]
    assert deleted == old[: len(old) - int(keep)]  # the oldest; never the undated or another RayJob

    (role,) = [doc for doc in cron_documents() if doc["kind"] == "Role"]
    verbs = {verb for rule in role["rules"] if "rayjobs" in rule["resources"] for verb in rule["verbs"]}
    assert {"list", "delete"} <= verbs


def test_cronjob_role_binding_names_the_namespace_it_is_applied_in():
    (binding,) = [doc for doc in cron_documents() if doc["kind"] == "RoleBinding"]
    (subject,) = binding["subjects"]
    placeholder = subject["namespace"]
    assert placeholder != "default" and not re.fullmatch(r"[a-z0-9-]+", placeholder), (
        "a namespace name the API server would accept: it must be filled in when applied"
    )
    fill = f'sed "s/{placeholder}/$NS/" infra/nightly-cronjob.yaml | kubectl apply -n "$NS" -f -'
    assert fill in (INFRA / "nightly-cronjob.yaml").read_text() and fill in (INFRA / "README.md").read_text()


def test_launcher_dashboard_is_not_exposed_without_authentication():
    """Ray 2.60 has no token authentication on launcher clusters: the dashboard (the Jobs API runs
    any command) listens on the head's loopback, reached through `ray dashboard`'s SSH tunnel."""
    commands = " ".join(launcher()["head_start_ray_commands"])
    (host,) = re.findall(r"--dashboard-host[= ](\S+)", commands)
    assert host == "127.0.0.1"


def test_infra_readme_names_every_file():
    readme = (INFRA / "README.md").read_text()
    for path in sorted(INFRA.iterdir()):
        if path.name != "README.md":
            assert f"`{path.name}`" in readme, f"infra/README.md does not mention {path.name}"


def test_ray_start_params_are_strings():
    """KubeRay's rayStartParams is a map of strings: an unquoted number is rejected by the API server."""
    cluster = rayjob()["spec"]["rayClusterSpec"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        for key, value in group["rayStartParams"].items():
            assert isinstance(value, str), f"rayStartParams.{key}: {value!r} must be quoted"

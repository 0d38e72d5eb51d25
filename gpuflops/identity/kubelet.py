"""Pod names, labels and containers from the kubelet's ``/pods`` endpoint.

Only ``KubeletClient`` talks to the kubelet; its transport, clock and token path come in
through the constructor.
"""

from __future__ import annotations

import json
import logging
import ssl
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SERVICE_ACCOUNT_TOKEN = Path("/var/run/secrets/kubernetes.io/serviceaccount/token")


@dataclass(frozen=True)
class PodInfo:
    """What the kubelet says about one pod."""

    uid: str
    namespace: str
    name: str
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    containers: Mapping[str, str]  # container id (no "containerd://" prefix) -> container name


# (url, headers, timeout_s) -> response body; raises OSError (or anything) on failure.
Fetch = Callable[[str, Mapping[str, str], float], bytes]

MAX_PODLIST_BYTES = 64 << 20


def urllib_fetch(ca_file: Path | None = None, verify_tls: bool = True) -> Fetch:
    """A Fetch over urllib that ignores proxy variables (the kubelet is local)."""
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    if not verify_tls:
        # The kubelet's serving certificate is often self-signed and not in any CA bundle.
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    handlers.append(urllib.request.HTTPSHandler(context=context))
    opener = urllib.request.build_opener(*handlers)

    def fetch(url: str, headers: Mapping[str, str], timeout_s: float) -> bytes:
        request = urllib.request.Request(url, headers=dict(headers))
        with opener.open(request, timeout=timeout_s) as response:
            body: bytes = response.read(MAX_PODLIST_BYTES + 1)
        if len(body) > MAX_PODLIST_BYTES:
            raise ValueError(f"kubelet pod list larger than {MAX_PODLIST_BYTES} bytes")
        return body

    return fetch


def _str_map(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        return {}
    return {str(k): str(v) for k, v in value.items() if isinstance(v, str)}


def parse_pod_list(body: bytes) -> dict[str, PodInfo]:
    """Parse the kubelet's ``/pods`` PodList, keyed by pod UID (and static pods' config hash).

    Raises ValueError when the body is not a PodList; skips malformed items.
    """
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"kubelet /pods is not JSON: {e}") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("items"), list):
        raise ValueError("kubelet /pods has no 'items' list")
    pods: dict[str, PodInfo] = {}
    for item in doc["items"]:
        meta = item.get("metadata") if isinstance(item, dict) else None
        if not isinstance(meta, dict):
            continue
        uid, ns, name = meta.get("uid"), meta.get("namespace"), meta.get("name")
        if not (isinstance(uid, str) and isinstance(ns, str) and isinstance(name, str)):
            continue
        containers: dict[str, str] = {}
        status = item.get("status")
        if isinstance(status, dict):
            for key in ("containerStatuses", "initContainerStatuses", "ephemeralContainerStatuses"):
                for cs in status.get(key) or []:
                    if isinstance(cs, dict) and isinstance(cs.get("containerID"), str):
                        cid = cs["containerID"].rpartition("://")[2]
                        containers[cid] = str(cs.get("name", ""))
        annotations = _str_map(meta.get("annotations"))
        pod = PodInfo(uid, ns, name, _str_map(meta.get("labels")), annotations, containers)
        pods[uid] = pod
        # A static pod's cgroup carries its config hash, which the mirror pod's UID is not.
        config_hash = annotations.get("kubernetes.io/config.hash")
        if config_hash:
            pods.setdefault(config_hash, pod)
    return pods


class KubeletClient:
    """Pod names and labels from the kubelet's ``/pods`` endpoint, cached and rate-limited.

    ``url`` is the authenticated port (``https://127.0.0.1:10250/pods``, bearer token from
    ``token_path``, re-read on each request because projected tokens rotate) or the read-only
    port (``http://127.0.0.1:10255/pods``). Failures keep the last good list and never raise.
    """

    def __init__(
        self,
        url: str = "https://127.0.0.1:10250/pods",
        token_path: Path | None = SERVICE_ACCOUNT_TOKEN,
        fetch: Fetch | None = None,
        clock: Callable[[], float] = time.monotonic,
        timeout_s: float = 2.0,
        refresh_s: float = 30.0,
        miss_refresh_s: float = 5.0,
    ) -> None:
        self._url = url
        self._token_path = token_path
        self._fetch = fetch if fetch is not None else urllib_fetch()
        self._clock = clock
        self._timeout_s = timeout_s
        self._refresh_s = refresh_s
        self._miss_refresh_s = miss_refresh_s
        self._pods: dict[str, PodInfo] | None = None
        self._fetched_at: float | None = None  # last success
        self._attempted_at: float | None = None  # last attempt, success or not
        self.requests = 0
        self.errors = 0

    def pod(self, uid: str) -> PodInfo | None:
        """The pod with this UID, or None when the kubelet does not know it or cannot be reached."""
        now = self._clock()
        stale = self._fetched_at is None or now - self._fetched_at >= self._refresh_s
        missing = self._pods is None or uid not in self._pods
        recently_tried = (
            self._attempted_at is not None and now - self._attempted_at < self._miss_refresh_s
        )
        if (stale or missing) and not recently_tried:
            self._refresh(now)
        return self._pods.get(uid) if self._pods is not None else None

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if self._token_path is not None and self._url.startswith("https:"):
            try:
                token = self._token_path.read_text().strip()
            except OSError as e:
                log.debug("no kubelet token at %s: %s", self._token_path, e)
            else:
                if token:
                    headers["Authorization"] = f"Bearer {token}"
        return headers

    def _refresh(self, now: float) -> None:
        self._attempted_at = now
        self.requests += 1
        try:
            pods = parse_pod_list(self._fetch(self._url, self._headers(), self._timeout_s))
        except Exception as e:  # any transport or parse failure: keep the last good list
            self.errors += 1
            level = logging.WARNING if self.errors == 1 else logging.DEBUG
            log.log(level, "kubelet pod list from %s failed: %s", self._url, e)
            return
        self._pods = pods
        self._fetched_at = now

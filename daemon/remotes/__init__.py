"""The OCI registry client: references, per-registry host configuration, credentials and the
HTTP client that resolves, fetches and pushes (what the Transfer service pulls and pushes with).

    reference  the docker/distribution reference grammar and docker's normalisation
    hosts      containerd's hosts.toml: mirrors, capabilities, TLS material, headers
    auth       credentials (Docker config.json) and the Basic/Bearer challenge flow
    errors     registry error bodies and statuses as containerd error categories
    registry   RegistryClient and Descriptor
"""

from pyctr.daemon.remotes.auth import (
    Credentials,
    CredentialsFunc,
    docker_config_credentials,
    docker_config_func,
    static_credentials,
)
from pyctr.daemon.remotes.hosts import RegistryHost, hosts_for
from pyctr.daemon.remotes.reference import Reference, parse
from pyctr.daemon.remotes.registry import (
    MANIFEST_TYPES,
    MT_DOCKER_LIST,
    MT_DOCKER_MANIFEST,
    MT_OCI_INDEX,
    MT_OCI_MANIFEST,
    Descriptor,
    RegistryClient,
    children,
)

__all__ = [
    "MANIFEST_TYPES",
    "MT_DOCKER_LIST",
    "MT_DOCKER_MANIFEST",
    "MT_OCI_INDEX",
    "MT_OCI_MANIFEST",
    "Credentials",
    "CredentialsFunc",
    "Descriptor",
    "Reference",
    "RegistryClient",
    "RegistryHost",
    "children",
    "docker_config_credentials",
    "docker_config_func",
    "hosts_for",
    "parse",
    "static_credentials",
]

"""The one settings object: every knob comes from an ISHGW_* environment variable."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from control_plane.client_access_settings import ClientAccessSettings, check_server_name
from control_plane.secret_refs import SecretPolicy

RedirectMode = Literal["auto", "true", "false"]
_BOOL_WORDS = {"1": "true", "yes": "true", "on": "true", "0": "false", "no": "false", "off": "false"}

# Unix socket paths are limited to 107 bytes on Linux; shim sockets live in run_dir.
MAX_RUN_DIR_LEN = 80


class Settings(ClientAccessSettings):
    """Gateway settings. Defaults give a working single-node gateway under ``home``."""

    model_config = SettingsConfigDict(env_prefix="ISHGW_", extra="ignore")

    home: Path = Field(default=Path("/var/lib/ish-gateway"), description="State directory")
    http_port: int = Field(default=8080, ge=1, le=65535)
    https_port: int = Field(default=8443, ge=0, le=65535, description="0 switches HTTPS off")
    listen_address: str = Field(default="0.0.0.0", description="Address nginx binds for clients")
    admin_listen: str = Field(default="127.0.0.1:9000")
    # At least 20 characters: a wrong key is throttled, the right one never is (issue 19), so a short key
    # could be found by guessing fast enough.
    admin_api_key: str | None = Field(
        default=None, min_length=20, description="Generated and stored 0600 when unset; 20 characters or more"
    )
    db_url: str | None = Field(default=None, description="SQLAlchemy URL; default SQLite under home")

    nginx_binary: str = "nginx"
    nginx_user: str | None = Field(default=None, description="Worker user when the master runs as root")
    nginx_worker_processes: str = Field(
        default="auto", pattern=r"^(auto|[1-9][0-9]{0,3})$", description="auto (one per CPU) or 1-9999"
    )
    run_dir: Path | None = Field(default=None, description="Unix sockets; default <home>/run")
    tls_cert: Path | None = None
    tls_key: Path | None = None
    http_redirect: RedirectMode = Field(
        default="auto",
        description="Redirect plain HTTP to HTTPS: auto (only with a certificate clients can verify, "
        "not the self-signed default), true, false",
    )
    domain: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Names clients use for the gateway (comma separated host names or IP addresses): the "
        "HTTP->HTTPS redirect goes to one of them, never to a client's Host; also read by the certificate "
        "scripts",
    )
    acme_webroot: Path | None = Field(
        default=None, description="HTTP-01 challenge files; default <home>/acme"
    )
    # Read by ssl/letsencrypt-setup.sh (with ISHGW_DOMAIN); stored in gateway.env like every setting.
    acme_server: str = Field(
        default="https://acme-v02.api.letsencrypt.org/directory", description="ACME directory URL"
    )
    email: str | None = Field(default=None, description="ACME account e-mail for ssl/letsencrypt-setup.sh")
    upstream_ca_file: Path = Field(
        default=Path("/etc/ssl/certs/ca-certificates.crt"), description="CAs trusted for HTTPS instances"
    )

    probes_enabled: bool = Field(default=True, description="Active health probes")
    log_listen: str | None = Field(
        default=None,
        pattern=r"^(?:127\.0\.0\.1:[0-9]{1,5}|unix:/[A-Za-z0-9._/-]{1,100})$",
        description="Where the controller receives nginx's access log stream: unix:/path (a datagram socket"
        " only the nginx workers may write to; default unix:<run_dir>/log.sock) or 127.0.0.1:PORT (UDP,"
        " which any local user can write to)",
    )
    log_stream_enabled: bool = Field(default=True, description="nginx access log stream to the controller")
    max_retry_after_s: float = Field(
        default=300.0, ge=1.0, le=86400.0, description="Longest rate limit a provider's Retry-After may set"
    )
    secret_dirs: Annotated[list[Path], NoDecode] | None = Field(
        default=None,
        description="Directories file: secret references may point into; default <home>/secrets/providers",
    )
    expose_instance_headers: bool = True
    client_max_body_size_mb: int = Field(default=16, ge=1, le=1024)
    lua_shm_usage_mb: int = Field(
        default=16,
        ge=1,
        le=4096,
        description="MiB of nginx shared memory for usage counters (lua_shared_dict gw_usage)",
    )
    lua_shm_state_mb: int = Field(
        default=4,
        ge=1,
        le=1024,
        description="MiB of nginx shared memory for request-path state (lua_shared_dict gw_state)",
    )
    usage_accounting: bool = Field(
        default=True,
        description="Count token usage in nginx (pool locations scan answers); false switches it off"
        " (README, Usage accounting: what it costs per request)",
    )
    usage_drain_interval_s: float = Field(
        default=5.0, ge=0.2, le=300.0, description="How often the controller drains nginx's usage counters"
    )
    usage_minute_retention_h: float = Field(
        default=48.0, ge=1.0, le=24 * 366, description="Hours minute usage buckets are kept"
    )
    usage_day_retention_d: int = Field(default=400, ge=1, le=36_600, description="Days day buckets are kept")
    scaling_commands: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Absolute paths of the programs scaling groups may start (the command driver's argv[0]);"
        " empty: the command driver starts nothing",
    )
    scaling_images: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Images scaling groups of driver docker may start (exact references, comma separated);"
        " empty: the docker driver starts nothing",
    )
    docker_host: str = Field(
        default="unix:///var/run/docker.sock",
        max_length=4096,
        # DOCKER_HOST, as Docker's own tools read it, when ISHGW_DOCKER_HOST is not set.
        validation_alias=AliasChoices("ISHGW_DOCKER_HOST", "DOCKER_HOST"),
        description="The Docker Engine API the docker driver uses: unix:///path (Docker's socket, or podman's"
        " from `podman system service`); DOCKER_HOST when unset",
    )
    stream_usage: Literal["on", "off"] = Field(
        default="on",
        description="With usage accounting: an OpenAI chat/completions stream that did not ask for usage is"
        " sent to the provider with stream_options.include_usage, and the usage chunk is taken out of the"
        " answer (the client gets the stream it asked for); off: such streams are estimated",
    )
    status_allow: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Extra CIDRs for /nginx_status"
    )

    reconcile_debounce_s: float = Field(default=0.15, ge=0.0, le=10.0)
    reconcile_max_wait_s: float = Field(default=1.0, ge=0.0, le=30.0)
    reload_min_interval_s: float = Field(default=0.5, ge=0.0, le=60.0)
    resync_interval_s: float = Field(default=30.0, ge=1.0, le=3600.0)
    generation_poll_s: float = Field(
        default=2.0,
        ge=0.1,
        le=3600.0,
        description="How often to look for registry changes made by other nodes",
    )
    generations_kept: int = Field(default=5, ge=2, le=100)
    metrics_key_label: bool = Field(
        default=False,
        description="Add a key label (the key id) to ishgw_tokens_total and ishgw_cost_usd_total: one series"
        " per key, instance and model",
    )

    # Alerts from the controller (control_plane/alerts): webhooks (Slack-compatible JSON) and e-mail.
    alert_webhook_urls: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma separated http(s) URLs that receive each alert as JSON with a Slack-compatible"
        " `text` field",
    )
    alert_smtp_host: str | None = Field(default=None, description="SMTP server for alert e-mail")
    alert_smtp_port: int = Field(default=587, ge=1, le=65535)
    alert_smtp_user: str | None = Field(default=None, description="SMTP login (with the password)")
    alert_smtp_password: SecretStr | None = Field(default=None, description="SMTP password; never logged")
    alert_smtp_starttls: bool = Field(default=True, description="STARTTLS before login and sending")
    alert_smtp_from: str = Field(default="ish-gateway@localhost", pattern=r"^[^\s<>,@]+@[^\s<>,@]+$")
    alert_email_to: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma separated addresses that receive alert e-mail"
    )
    alert_rate_per_min: float = Field(
        default=20.0, ge=0.1, le=6000.0, description="Alerts sent per minute on average (bursts of 10)"
    )
    alert_retries: int = Field(
        default=5, ge=0, le=20, description="Retries of a failed delivery (backoff 1 s, 2 s, ...)"
    )
    alert_interval_s: float = Field(
        default=1.0, ge=0.1, le=60.0, description="How often alert conditions are evaluated"
    )
    alert_certificate_days: float = Field(
        default=14.0, ge=1.0, le=365.0, description="Alert when the TLS certificate expires in fewer days"
    )
    admin_session_ttl_s: float = Field(
        default=28_800.0, ge=60.0, le=604_800.0, description="Status page login session lifetime (seconds)"
    )
    status_refresh_s: float = Field(
        default=5.0, ge=1.0, le=300.0, description="How often the status page polls for fresh figures"
    )

    registry_key_file: Path | None = Field(
        default=None,
        description="AES-256 key that encrypts provider keys in the registry; default"
        " <home>/secrets/registry.key (created 0600 on first start)",
    )
    backup_interval_h: float = Field(
        default=0.0, ge=0.0, le=24 * 366, description="Hours between backups the controller makes; 0: none"
    )
    backup_keep: int = Field(
        default=7, ge=1, le=10_000, description="Periodic backups kept in <home>/backups"
    )
    admin_max_body_mb: int = Field(
        default=64,
        ge=1,
        le=1024,
        description="Largest body of a configuration import or migration (other admin bodies: 1 MiB)",
    )

    @field_validator("http_redirect", mode="before")
    @classmethod
    def _redirect_word(cls, value: object) -> object:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, str):
            word = value.strip().lower()
            return _BOOL_WORDS.get(word, word)
        return value

    @field_validator(
        "status_allow", "secret_dirs", "domain", "scaling_commands", "scaling_images", mode="before"
    )
    @classmethod
    def _split_csv(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("scaling_commands")
    @classmethod
    def _absolute(cls, value: list[str]) -> list[str]:
        for path in value:
            if not os.path.isabs(path) or "\x00" in path:
                raise ValueError(f"{path!r}: each entry is an absolute path")
        return value

    @field_validator("docker_host")
    @classmethod
    def _unix_socket(cls, value: str) -> str:
        if not value.startswith("unix:///") or "\x00" in value:
            raise ValueError("a unix socket: unix:///path")
        return value

    @field_validator("domain")
    @classmethod
    def _names(cls, value: list[str]) -> list[str]:
        return [check_server_name(name) for name in value]

    @field_validator("alert_webhook_urls", "alert_email_to", mode="before")
    @classmethod
    def _split_alert_csv(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("alert_webhook_urls")
    @classmethod
    def _webhook_urls(cls, value: list[str]) -> list[str]:
        for url in value:
            parts = urlsplit(url)
            if parts.scheme not in ("http", "https") or not parts.hostname or any(c.isspace() for c in url):
                raise ValueError("each alert webhook URL must be http(s)://host/...")
        return value

    @field_validator("alert_email_to")
    @classmethod
    def _email_addresses(cls, value: list[str]) -> list[str]:
        for address in value:
            if not re.fullmatch(r"[^\s<>,@]+@[^\s<>,@]+", address):
                raise ValueError("each alert e-mail address must look like name@domain")
        return value

    @property
    def database_url(self) -> str:
        return self.db_url or f"sqlite:///{self.home / 'ishgw.db'}"

    @property
    def nginx_dir(self) -> Path:
        return self.home / "nginx"

    @property
    def sockets_dir(self) -> Path:
        return self.run_dir or self.home / "run"

    @property
    def log_address(self) -> str:
        """The log stream's address: "unix:/path" or "127.0.0.1:PORT"."""
        return self.log_listen or f"unix:{self.sockets_dir / 'log.sock'}"

    @property
    def secret_directories(self) -> list[Path]:
        return [self.home / "secrets" / "providers"] if self.secret_dirs is None else self.secret_dirs

    @property
    def provider_env_file(self) -> Path:
        return self.home / "provider.env"

    def secret_policy(self) -> SecretPolicy:
        """Where api_key references may point: ISHGW_SECRET_DIRS, the names provider.env defines."""
        return SecretPolicy(tuple(self.secret_directories), self.provider_env_file, os.environ)

    @property
    def admin_host_port(self) -> tuple[str, int]:
        host, _, port = self.admin_listen.rpartition(":")
        return host.strip("[]") or "127.0.0.1", int(port)

    @property
    def admin_key_file(self) -> Path:
        return self.home / "secrets" / "admin_api_key"

    @property
    def registry_key_path(self) -> Path:
        return self.registry_key_file or self.home / "secrets" / "registry.key"

    @property
    def backup_dir(self) -> Path:
        return self.home / "backups"

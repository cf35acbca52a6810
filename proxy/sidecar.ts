// One sidecar: builds the listeners from a configuration, starts them, swaps identities on
// reload, drains on shutdown. Several sidecars can live in one process (`ashmesh up`, tests):
// each has its own registry, logger and identity store.

import type { Server } from "node:http";
import type { AddressInfo } from "node:net";
import { hostname } from "node:os";
import type { DestinationStream } from "pino";
import { type Config, isLoopback } from "../config/schema.js";
import { AcmeManager, type AcmeOptions } from "./acme.js";
import { ChallengeResponder } from "./acme-challenge.js";
import { type AdminSources, createAdminServer } from "./admin.js";
import { CrlFetcher } from "./crl-fetch.js";
import { Edges } from "./edges.js";
import { type Identity, IdentityError, identityNotices, loadIdentity } from "./identity.js";
import { IdentityStore } from "./identity-store.js";
import { Inbound } from "./inbound.js";
import { createLogger, type Logger } from "./log.js";
import { type Direction, Metrics } from "./metrics.js";
import { Outbound } from "./outbound.js";
import { inheritedSockets, type ListenerName } from "./systemd.js";
import { TcpListeners } from "./tcp.js";
import { assertUsable } from "./tls.js";

export interface SidecarOptions {
  /** Where log lines go (default stdout). */
  logDestination?: DestinationStream;
  logger?: Logger;
  /** prom-client's process metrics; off for extra sidecars sharing one process. */
  processMetrics?: boolean;
  /** Watch the identity files (default true). */
  watch?: boolean;
  /** Use listening sockets handed over by systemd (LISTEN_FDS), default true. */
  inheritSockets?: boolean;
  /** Listening sockets to use instead (a worker gets the primary's, cluster.ts). */
  sockets?: Map<ListenerName, number>;
  /**
   * Run the parts that keep the identity files fresh (the ACME manager, the CRL fetcher), default
   * true. Workers leave them to the primary and only take the files it writes.
   */
  control?: boolean;
  /** What the admin listener answers from, instead of this process alone (the primary of workers). */
  admin?: Partial<Pick<AdminSources, "registry" | "ready" | "status" | "edges">>;
  /** The ACME manager's clock and jitter (tests). */
  acme?: AcmeOptions;
}

/** What keeps the identity files fresh: the ACME manager (tls.cert, tls.key) and the CRL fetcher (tls.crl). */
interface Suppliers {
  acme: AcmeManager | null;
  responder: ChallengeResponder | null;
  crl: CrlFetcher | null;
}

export interface Listening {
  inbound: AddressInfo | null;
  outbound: Array<{ name: string; address: AddressInfo }>;
  admin: AddressInfo | null;
  tcp: Array<{ name: string; direction: Direction; address: AddressInfo }>;
}

const DAY_MS = 86_400_000;

export class Sidecar {
  readonly metrics: Metrics;
  readonly logger: Logger;
  readonly edges = new Edges();
  readonly identity: IdentityStore;
  private inbound: Inbound | null = null;
  private outbound: Outbound | null = null;
  private tcp: TcpListeners | null = null;
  private admin: Server | null = null;
  private state: "created" | "starting" | "running" | "draining" | "stopped" = "created";
  private listening: Listening = { inbound: null, outbound: [], admin: null, tcp: [] };
  private expiryTimer: NodeJS.Timeout | null = null;
  private readonly startedAt = new Date();

  /** The ACME manager, with the acme section. */
  readonly acme: AcmeManager | null;
  /** The CRL fetcher, with tls.crlUrl. */
  readonly crlFetcher: CrlFetcher | null;
  private readonly responder: ChallengeResponder | null;

  /** The ACME challenges this sidecar answers (cluster.ts keeps the workers' in step with the primary's). */
  get challenges(): ChallengeResponder | null {
    return this.responder;
  }

  private constructor(
    readonly config: Config,
    identity: Identity,
    logger: Logger,
    private readonly options: SidecarOptions,
    suppliers: Suppliers,
  ) {
    this.logger = logger;
    this.acme = suppliers.acme;
    this.crlFetcher = suppliers.crl;
    this.responder = suppliers.responder;
    this.identity = new IdentityStore(
      identity,
      config.tls,
      config.service.dnsName,
      (next) => assertUsable(next, config.tls),
      config.limits,
    );
    this.metrics = new Metrics(
      {
        certificates: () => {
          const id = this.identity.current;
          return [
            { cert: "server" as const, subject: id.server.summary.subject, notAfter: id.server.summary.notAfter },
            { cert: "client" as const, subject: id.client.summary.subject, notAfter: id.client.summary.notAfter },
            ...id.ca.summaries.map((s) => ({ cert: "ca" as const, subject: s.subject, notAfter: s.notAfter })),
          ];
        },
        crls: () =>
          (this.identity.current.crl?.lists ?? []).map((l) => ({ issuer: l.issuer, nextUpdate: l.nextUpdate })),
        acme: () => {
          const { acme, responder } = this;
          if (!acme || !responder) return null;
          const s = acme.status;
          const seconds = (iso: string | null | undefined) => (iso ? Date.parse(iso) / 1000 : null);
          return {
            directory: s.directory,
            orders: acme.counts,
            consecutiveFailures: s.consecutive_failures,
            lastSuccess: seconds(s.last_success),
            nextRenewal: seconds(s.next_renewal),
            certificate: s.certificate
              ? {
                  notBefore: Date.parse(s.certificate.not_before) / 1000,
                  notAfter: Date.parse(s.certificate.not_after) / 1000,
                }
              : null,
            challenges: [...responder.counts].map(([key, count]) => {
              const [type = "", result = ""] = key.split("|");
              return { type, result, count };
            }),
          };
        },
        crlFetch: () => this.crlFetcher?.samples() ?? null,
      },
      { processMetrics: options.processMetrics ?? true },
    );
    this.identity.on("change", (change) => {
      this.inbound?.applyIdentity(change);
      this.outbound?.applyIdentity(change);
      this.tcp?.applyIdentity(change);
      this.metrics.certReloads.inc({ result: "ok" });
      const s = change.next.server.summary;
      this.logger.info({
        event: "cert_reloaded",
        trigger: change.trigger,
        serial: s.serial,
        not_after: s.notAfter.toISOString(),
        server_changed: change.serverChanged,
        client_changed: change.clientChanged,
        trust_changed: change.trustChanged,
      });
      this.reportIdentity(change.next);
    });
    this.identity.on("failed", (err, trigger) => {
      this.metrics.certReloads.inc({ result: "failed" });
      this.logger.error({
        event: "cert_reload_failed",
        trigger,
        reason: err.message,
        ...(err instanceof IdentityError ? { field: err.field, file: err.file } : {}),
        kept_serial: this.identity.current.server.summary.serial,
      });
    });
  }

  /** Loads and validates the identity; an IdentityError names the field and file at fault. */
  static async create(config: Config, options: SidecarOptions = {}): Promise<Sidecar> {
    const logger =
      options.logger ??
      createLogger({
        service: config.service.name,
        level: config.log.level,
        ...(options.logDestination ? { destination: options.logDestination } : {}),
      });
    const control = options.control ?? true;
    const responder = config.acme ? new ChallengeResponder(logger, config.limits) : null;
    const acme = responder && control ? new AcmeManager(config, logger, responder, options.acme) : null;
    const crl = config.tls.crlUrl.length > 0 && control ? new CrlFetcher(config, logger) : null;
    try {
      // A wrong directory URL or CA bundle stops the start here (exit 2); a CA that is down does not.
      const down = await acme?.verifyDirectory();
      if (down) logger.warn({ event: "acme_directory_unreachable", reason: down });
      // CRLs first: the first certificate is validated against them before it is written.
      await crl?.fetchOnce();
      if (control && config.acme?.http01Listen) await responder?.listenHttp01(config.acme.http01Listen);
      // No usable certificate yet (first start, or expired): order one before anything listens.
      await acme?.ensureCertificate();
      const identity = await loadIdentity(config.tls, { dnsName: config.service.dnsName });
      assertUsable(identity, config.tls);
      return new Sidecar(config, identity, logger, options, { acme, responder, crl });
    } catch (err) {
      await Promise.allSettled([acme?.stop(), crl?.stop(), responder?.close()]);
      throw err;
    }
  }

  async start(): Promise<Listening> {
    const { config, logger } = this;
    this.state = "starting";
    const deps = {
      config,
      identity: this.identity.current,
      metrics: this.metrics,
      logger,
      edges: this.edges,
      acme: config.acme?.challenge === "tls-alpn-01" ? this.responder : null,
    };
    const sockets =
      this.options.sockets ??
      (this.options.inheritSockets === false ? new Map<ListenerName, number>() : inheritedSockets());
    this.reportIdentity(this.identity.current);
    if (config.inbound.enabled) {
      if (!config.inbound.verifyClient) {
        logger.warn({
          event: "config_warning",
          message:
            "inbound.verifyClient is false: clients without a certificate are accepted where no allow-list applies",
        });
      }
      const appHost = new URL(config.inbound.app).hostname.replace(/^\[|\]$/g, "");
      if (!isLoopback(appHost)) {
        logger.warn({
          event: "config_warning",
          message: `inbound.app ${config.inbound.app} is not on loopback: requests cross a network in plain HTTP after the sidecar verified them; run the app in the sidecar's network namespace and use 127.0.0.1`,
        });
      }
      if (!config.inbound.allow) {
        logger.warn({
          event: "config_warning",
          message: "inbound.allow is not set: any identity the mesh CA signed may call this service",
        });
      }
      this.inbound = new Inbound(deps);
      this.listening.inbound = await this.inbound.listen(sockets.get("inbound"));
      logger.info({
        event: "listening",
        listener: "inbound",
        ...(sockets.has("inbound") ? { socket: "systemd" } : {}),
        address: formatAddress(this.listening.inbound),
        app: config.inbound.app,
      });
    }
    if (config.outbound.enabled) {
      this.outbound = new Outbound(deps);
      this.listening.outbound = await this.outbound.listen(sockets.get("outbound"));
      for (const l of this.listening.outbound) {
        logger.info({ event: "listening", listener: "outbound", name: l.name, address: formatAddress(l.address) });
      }
    }
    if (config.tcp.inbound.length > 0 || config.tcp.outbound.length > 0) {
      for (const l of config.tcp.inbound) {
        if (l.allow.includes("*")) {
          logger.warn({
            event: "config_warning",
            message: `tcp.inbound ${l.name}: allow has "*": any identity the mesh CA signed reaches ${l.target}`,
          });
        }
      }
      this.tcp = new TcpListeners(deps);
      this.listening.tcp = await this.tcp.listen();
      for (const l of this.listening.tcp) {
        const spec = [...config.tcp.inbound, ...config.tcp.outbound].find((s) => s.name === l.name);
        logger.info({
          event: "listening",
          listener: l.name,
          protocol: "tcp",
          direction: l.direction,
          address: formatAddress(l.address),
          target: spec?.target,
        });
      }
    }
    if (this.options.watch ?? true) await this.identity.watch();
    // Renewals and CRL refreshes only write files; the watcher above takes them into use.
    this.acme?.start();
    this.crlFetcher?.start();
    // Ready from here: identity loaded, data listeners up. The admin listener comes last so that
    // its "listening" line means /readyz already answers 200.
    this.state = "running";
    if (config.admin.enabled) {
      this.admin = createAdminServer({
        timeoutMs: config.limits.headersTimeoutMs,
        hosts: new Set(
          ["localhost", hostname(), config.service.name, config.service.dnsName, ...config.admin.hosts].map((h) =>
            h.toLowerCase(),
          ),
        ),
        registry: this.metrics.registry,
        ready: () => this.readiness(),
        status: () => this.status(),
        edges: () => this.edges.list(),
        ...this.options.admin,
      });
      const { host, port } = config.admin.listen;
      const fd = sockets.get("admin");
      await new Promise<void>((resolve, reject) => {
        this.admin?.once("error", reject);
        this.admin?.listen(fd === undefined ? { port, host } : { fd }, () => resolve());
      });
      this.listening.admin = this.admin.address() as AddressInfo;
      logger.info({ event: "listening", listener: "admin", address: formatAddress(this.listening.admin) });
    }
    this.expiryTimer = setInterval(() => this.reportIdentity(this.identity.current), 3600_000).unref();
    return this.listening;
  }

  /** Warnings that do not stop the sidecar: key permissions, expiry within 30 days, CRL freshness. */
  private reportIdentity(identity: Identity): void {
    for (const warning of identity.warnings) this.logger.warn({ event: "identity_warning", message: warning });
    for (const notice of identityNotices(identity, new Date(), this.config.acme ?? undefined)) {
      if (notice.event === "cert_expiring") {
        this.logger.warn({
          event: notice.event,
          subject: notice.subject,
          serial: notice.serial,
          days_left: notice.daysLeft,
          not_after: notice.notAfter.toISOString(),
        });
      } else {
        this.logger[notice.event === "crl_expired" ? "error" : "warn"]({
          event: notice.event,
          issuer: notice.issuer,
          next_update: notice.nextUpdate.toISOString(),
          message: notice.hint,
        });
      }
    }
  }

  reload(trigger = "SIGHUP"): Promise<boolean> {
    return this.identity.reload(trigger);
  }

  readiness(): { ready: true } | { ready: false; reason: string } {
    if (this.state === "running") return { ready: true };
    return { ready: false, reason: this.state === "draining" ? "draining" : `sidecar is ${this.state}` };
  }

  get addresses(): Listening {
    return this.listening;
  }

  status(): unknown {
    const id = this.identity.current;
    const cert = (s: typeof id.server.summary) => ({
      subject: s.subject,
      identity: s.identity,
      sans: [...s.dns, ...s.uris],
      issuer: s.issuer,
      serial: s.serial,
      not_before: s.notBefore.toISOString(),
      not_after: s.notAfter.toISOString(),
      days_left: Math.floor((s.notAfter.getTime() - Date.now()) / DAY_MS),
      sha256: s.sha256,
    });
    return {
      service: this.config.service.name,
      dns_name: this.config.service.dnsName,
      state: this.state,
      started_at: this.startedAt.toISOString(),
      identity: {
        version: id.version,
        loaded_at: id.loadedAt.toISOString(),
        server: cert(id.server.summary),
        client: cert(id.client.summary),
        ca: id.ca.summaries.map(cert),
        crl: (id.crl?.lists ?? []).map((l) => ({
          issuer: l.issuer,
          this_update: l.thisUpdate.toISOString(),
          next_update: l.nextUpdate?.toISOString() ?? null,
          revoked: l.revoked.size,
        })),
        warnings: id.warnings,
      },
      last_reload: this.identity.lastReload
        ? { ...this.identity.lastReload, at: this.identity.lastReload.at.toISOString() }
        : null,
      listeners: {
        inbound: this.listening.inbound
          ? {
              address: formatAddress(this.listening.inbound),
              verify_client: this.config.inbound.verifyClient,
              app: this.config.inbound.app,
            }
          : null,
        outbound: this.listening.outbound.map((l) => ({ name: l.name, address: formatAddress(l.address) })),
        admin: this.listening.admin ? formatAddress(this.listening.admin) : null,
        tcp: this.tcp?.status() ?? { inbound: [], outbound: [] },
      },
      open_connections: { inbound: this.inbound?.openConnections ?? 0, tcp_tunnels: this.tcp?.openTunnels ?? 0 },
      ...(this.acme ? { acme: this.acme.status } : {}),
      ...(this.crlFetcher ? { crl_fetch: this.crlFetcher.status } : {}),
    };
  }

  /** SIGTERM: not ready, stop accepting, let requests in flight finish (up to drainTimeoutMs), stop. */
  async drain(): Promise<void> {
    if (this.state === "draining" || this.state === "stopped") return;
    this.state = "draining";
    const deadline = Date.now() + this.config.limits.drainTimeoutMs;
    const open = { open_connections: this.inbound?.openConnections ?? 0, tcp_tunnels: this.tcp?.openTunnels ?? 0 };
    // Each drain stops its listeners before its first await: the line is written once nothing new
    // is accepted, so whoever reads it (systemd's journal, a test) sees the sidecar as it says.
    const drained = Promise.all([
      this.inbound?.drain(deadline),
      this.outbound?.drain(deadline),
      this.tcp?.drain(deadline),
    ]);
    this.logger.info({ event: "draining", timeout_ms: this.config.limits.drainTimeoutMs, ...open });
    await drained;
    await this.stop();
  }

  async stop(): Promise<void> {
    if (this.state === "stopped") return;
    this.state = "stopped";
    if (this.expiryTimer) clearInterval(this.expiryTimer);
    await Promise.all([this.acme?.stop(), this.crlFetcher?.stop()]);
    await this.responder?.close();
    await this.identity.close();
    await Promise.all([this.inbound?.close(), this.outbound?.close(), this.tcp?.close()]);
    if (this.admin) {
      this.admin.closeAllConnections();
      await new Promise<void>((resolve) => this.admin?.close(() => resolve()));
    }
    this.logger.info({ event: "stopped" });
  }
}

export function formatAddress(a: AddressInfo): string {
  return a.family === "IPv6" ? `[${a.address}]:${a.port}` : `${a.address}:${a.port}`;
}

// Every metric of DESIGN §4, on a registry of this sidecar's own (the global one leaks between
// sidecars in one process and between tests). Metric and label names are public API.
import { Counter, collectDefaultMetrics, Gauge, Histogram, Registry } from "prom-client";

export type Direction = "inbound" | "outbound";

/** Why a handshake or a connection was refused; the `reason` label of mtls_handshake_failures. */
export type FailureReason =
  | "no_client_cert"
  | "unknown_ca"
  | "expired"
  | "not_yet_valid"
  | "revoked"
  | "crl_expired"
  | "crl_missing"
  | "bad_san"
  | "bad_pin"
  | "bad_signature"
  | "protocol"
  | "timeout"
  | "aborted"
  | "overload"
  | "not_tls"
  | "bad_certificate"
  | "other";

export interface CertGaugeSource {
  /** Certificates whose days to expiry are published, computed at scrape time. */
  certificates(): Array<{ cert: "server" | "client" | "ca"; subject: string; notAfter: Date }>;
  /** The CRLs in use and when each must be replaced. */
  crls(): Array<{ issuer: string; nextUpdate: Date | null }>;
  /** The ACME manager's counts and schedule; null without the acme section (no series then). */
  acme?(): AcmeSample | null;
  /** The CRL fetcher's counts per URL; null without tls.crlUrl. */
  crlFetch?(): CrlFetchSample[] | null;
}

export interface AcmeSample {
  directory: string;
  orders: { ok: number; failed: number };
  consecutiveFailures: number;
  /** Unix seconds; null until the first success (since start or in the state file). */
  lastSuccess: number | null;
  nextRenewal: number | null;
  /** (notAfter − now) / (notAfter − notBefore) of the certificate on disk. */
  certificate: { notBefore: number; notAfter: number } | null;
  challenges: Array<{ type: string; result: string; count: number }>;
}

export interface CrlFetchSample {
  url: string;
  ok: number;
  failed: number;
  /** Unix seconds of the last successful fetch (the fetcher's start until one succeeds). */
  lastSuccess: number;
}

const DAY_MS = 86_400_000;
const LATENCY_BUCKETS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10];
const HANDSHAKE_BUCKETS = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1];

/** What a request or connection carried: the `protocol` label. */
export type Protocol = "http1" | "h2" | "grpc" | "ws" | "tcp";
/** A connection is HTTP/1.1, HTTP/2 (gRPC rides on it) or a TCP tunnel. */
export type ConnectionProtocol = Extract<Protocol, "http1" | "h2" | "tcp">;

/**
 * The bytes a TCP listener carried, read at scrape time: the totals of closed tunnels plus what
 * open ones have moved so far. `in` flows from the side that connected to the side it reaches.
 */
export interface TunnelBytes {
  direction: Direction;
  listener: string;
  read(): { in: number; out: number };
}

export interface RequestRecorder {
  record(protocol: Protocol, code: number, seconds: number): void;
}

export class Metrics {
  readonly registry = new Registry();
  readonly handshakes: Counter<"direction" | "result">;
  readonly handshakeFailures: Counter<"direction" | "reason">;
  readonly handshakeDuration: Histogram<"direction">;
  readonly revokedConnections: Counter<"direction">;
  readonly authzDenied: Counter<"identity" | "route">;
  readonly requests: Counter<"direction" | "peer" | "code" | "protocol">;
  readonly requestDuration: Histogram<"direction" | "peer" | "protocol">;
  readonly openConnections: Gauge<"direction" | "protocol">;
  readonly certReloads: Counter<"result">;
  private readonly recorders = new Map<string, RequestRecorder>();
  private readonly tunnelBytes: TunnelBytes[] = [];

  constructor(certSource: CertGaugeSource, options: { processMetrics?: boolean } = {}) {
    const registers = [this.registry];
    if (options.processMetrics ?? true) collectDefaultMetrics({ register: this.registry });
    this.handshakes = new Counter({
      name: "mtls_handshake_total",
      help: "mTLS handshakes, by direction and result (ok/failed).",
      labelNames: ["direction", "result"],
      registers,
    });
    this.handshakeFailures = new Counter({
      name: "mtls_handshake_failures",
      help: "Failed or refused mTLS handshakes, by direction and reason.",
      labelNames: ["direction", "reason"],
      registers,
    });
    this.handshakeDuration = new Histogram({
      name: "mtls_handshake_duration_seconds",
      help: "Time from TCP accept (inbound) or connect (outbound) to a completed TLS handshake.",
      labelNames: ["direction"],
      buckets: HANDSHAKE_BUCKETS,
      registers,
    });
    this.revokedConnections = new Counter({
      name: "mtls_revoked_connections",
      help: "Connections refused or closed because the peer's certificate is revoked.",
      labelNames: ["direction"],
      registers,
    });
    this.authzDenied = new Counter({
      name: "mtls_authz_denied_total",
      help: "Requests from a verified peer that the allow-list refused (403).",
      labelNames: ["identity", "route"],
      registers,
    });
    this.requests = new Counter({
      name: "mtls_requests_total",
      help: "Requests proxied, by direction, peer identity, status code and protocol.",
      labelNames: ["direction", "peer", "code", "protocol"],
      registers,
    });
    this.requestDuration = new Histogram({
      name: "mtls_request_duration_seconds",
      help: "Time from a request's arrival to the end of its response, by direction and peer.",
      labelNames: ["direction", "peer", "protocol"],
      buckets: LATENCY_BUCKETS,
      registers,
    });
    this.openConnections = new Gauge({
      name: "mtls_open_connections",
      help: "Open mTLS connections, by direction and protocol (http1, h2, tcp).",
      labelNames: ["direction", "protocol"],
      registers,
    });
    this.certReloads = new Counter({
      name: "mtls_cert_reloads_total",
      help: "Reloads of certificate, key, CA bundle or CRL, by result.",
      labelNames: ["result"],
      registers,
    });
    new Gauge({
      // Shared state, the same in every worker: one value, not a sum (cluster.ts).
      aggregator: "first",
      name: "mtls_cert_expiry_days",
      help: "Days until a certificate in use expires (negative once expired).",
      labelNames: ["cert", "subject"],
      registers,
      collect() {
        this.reset();
        const now = Date.now();
        for (const c of certSource.certificates()) {
          this.set({ cert: c.cert, subject: c.subject }, (c.notAfter.getTime() - now) / DAY_MS);
        }
      },
    });
    new Gauge({
      // Shared state, the same in every worker: one value, not a sum (cluster.ts).
      aggregator: "first",
      name: "mtls_crl_next_update_days",
      help: "Days until the CRL in use passes its nextUpdate; after that every peer of its CA is refused.",
      labelNames: ["issuer"],
      registers,
      collect() {
        this.reset();
        const now = Date.now();
        for (const crl of certSource.crls()) {
          if (crl.nextUpdate) this.set({ issuer: crl.issuer }, (crl.nextUpdate.getTime() - now) / DAY_MS);
        }
      },
    });
    const tunnels = this.tunnelBytes;
    new Counter({
      name: "mtls_tcp_bytes_total",
      help: "Bytes carried by TCP tunnels, by direction, listener and flow (in: from the side that connected).",
      labelNames: ["direction", "listener", "flow"],
      registers,
      // Read at scrape time, so a tunnel costs nothing per chunk and a long-lived one still shows.
      collect() {
        this.reset();
        for (const t of tunnels) {
          const bytes = t.read();
          this.inc({ direction: t.direction, listener: t.listener, flow: "in" }, bytes.in);
          this.inc({ direction: t.direction, listener: t.listener, flow: "out" }, bytes.out);
        }
      },
    });
    this.registerAcme(certSource, registers);
    // Every direction shows up at 0 rather than being absent until the first event.
    for (const direction of ["inbound", "outbound"] as const) {
      for (const protocol of ["http1", "h2"] as const) this.openConnections.set({ direction, protocol }, 0);
      this.revokedConnections.inc({ direction }, 0);
      for (const result of ["ok", "failed"]) this.handshakes.inc({ direction, result }, 0);
    }
    for (const result of ["ok", "failed"]) this.certReloads.inc({ result }, 0);
  }

  /**
   * ACME and CRL-fetch series, computed at scrape time from the manager and the fetcher. They are
   * labelled (directory, url), so that a sidecar without ACME or crlUrl has none rather than zeros
   * an alert would read as "never succeeded".
   */
  private registerAcme(source: CertGaugeSource, registers: Registry[]): void {
    const acme = () => source.acme?.() ?? null;
    const crl = () => source.crlFetch?.() ?? [];
    new Counter({
      name: "mtls_acme_orders_total",
      help: "ACME certificate orders, by directory and result (ok/failed).",
      labelNames: ["directory", "result"],
      registers,
      collect() {
        this.reset();
        const a = acme();
        if (!a) return;
        this.inc({ directory: a.directory, result: "ok" }, a.orders.ok);
        this.inc({ directory: a.directory, result: "failed" }, a.orders.failed);
      },
    });
    const gauge = (name: string, help: string, value: (a: AcmeSample) => number | null) =>
      new Gauge({
        // Shared state, the same in every worker: one value, not a sum (cluster.ts).
        aggregator: "first",
        name,
        help,
        labelNames: ["directory"],
        registers,
        collect() {
          this.reset();
          const a = acme();
          const v = a && value(a);
          if (a && v !== null) this.set({ directory: a.directory }, v);
        },
      });
    gauge(
      "mtls_acme_consecutive_failures",
      "ACME orders that failed since the last success; 0 when the last one succeeded.",
      (a) => a.consecutiveFailures,
    );
    gauge(
      "mtls_acme_last_success_timestamp_seconds",
      "When the last ACME order succeeded (Unix seconds).",
      (a) => a.lastSuccess,
    );
    gauge(
      "mtls_acme_next_renewal_timestamp_seconds",
      "When the certificate is due for renewal (Unix seconds): acme.renewAt of its lifetime, jittered earlier.",
      (a) => a.nextRenewal,
    );
    // Labelled like mtls_cert_expiry_days (cert="server" and "client": one certificate serves
    // both with ACME), so that the expiry alerts can leave healthy ACME certificates alone.
    new Gauge({
      // Shared state, the same in every worker: one value, not a sum (cluster.ts).
      aggregator: "first",
      name: "mtls_acme_cert_lifetime_remaining_ratio",
      help: "Share of the ACME certificate's lifetime still ahead (1 when issued, 0 at expiry); renewal is due at 1 - acme.renewAt.",
      labelNames: ["directory", "cert"],
      registers,
      collect() {
        this.reset();
        const a = acme();
        if (!a?.certificate) return;
        const { notBefore, notAfter } = a.certificate;
        const ratio = (notAfter - Date.now() / 1000) / (notAfter - notBefore);
        for (const cert of ["server", "client"]) this.set({ directory: a.directory, cert }, ratio);
      },
    });
    new Counter({
      name: "mtls_acme_challenges_total",
      help: "ACME challenges the sidecar was asked to answer, by type (tls-alpn-01/http-01) and result (answered/unknown).",
      labelNames: ["type", "result"],
      registers,
      collect() {
        this.reset();
        for (const c of acme()?.challenges ?? []) this.inc({ type: c.type, result: c.result }, c.count);
      },
    });
    new Counter({
      name: "mtls_crl_fetch_total",
      help: "CRL fetches from tls.crlUrl and the CRL distribution points, by URL and result (ok/failed).",
      labelNames: ["url", "result"],
      registers,
      collect() {
        this.reset();
        for (const c of crl()) {
          this.inc({ url: c.url, result: "ok" }, c.ok);
          this.inc({ url: c.url, result: "failed" }, c.failed);
        }
      },
    });
    new Gauge({
      // Shared state, the same in every worker: one value, not a sum (cluster.ts).
      aggregator: "first",
      name: "mtls_crl_last_fetch_timestamp_seconds",
      help: "When a CRL was last fetched and validated from this URL (Unix seconds; the fetcher's start until then).",
      labelNames: ["url"],
      registers,
      collect() {
        this.reset();
        for (const c of crl()) this.set({ url: c.url }, c.lastSuccess);
      },
    });
  }

  handshakeOk(direction: Direction, seconds: number): void {
    this.handshakes.inc({ direction, result: "ok" });
    this.handshakeDuration.observe({ direction }, seconds);
  }

  handshakeFailed(direction: Direction, reason: FailureReason): void {
    this.handshakes.inc({ direction, result: "failed" });
    this.handshakeFailures.inc({ direction, reason });
    if (reason === "revoked") this.revokedConnections.inc({ direction });
  }

  /** Publishes a TCP listener's byte counts in mtls_tcp_bytes_total. */
  countTunnelBytes(source: TunnelBytes): void {
    this.tunnelBytes.push(source);
  }

  /** Counts `socket` in mtls_open_connections until it closes. */
  trackConnection(
    direction: Direction,
    protocol: ConnectionProtocol,
    socket: { once(event: "close", fn: () => void): unknown },
  ): void {
    const gauge = this.openConnections.labels(direction, protocol);
    gauge.inc();
    socket.once("close", () => gauge.dec());
  }

  /**
   * A recorder for one (direction, peer) pair, cached: the label lookups happen once per pair
   * and protocol, not once per request. Peers are verified identities, so the cache is bounded
   * by the mesh.
   */
  recorder(direction: Direction, peer: string): RequestRecorder {
    const key = `${direction}\u0000${peer}`;
    let recorder = this.recorders.get(key);
    if (!recorder) {
      const durations = new Map<Protocol, ReturnType<typeof this.requestDuration.labels>>();
      const counters = new Map<string, ReturnType<typeof this.requests.labels>>();
      const { requests, requestDuration } = this;
      recorder = {
        record(protocol, code, seconds) {
          const id = `${protocol}${code}`;
          let counter = counters.get(id);
          if (!counter) {
            counter = requests.labels(direction, peer, String(code), protocol);
            counters.set(id, counter);
          }
          counter.inc();
          let duration = durations.get(protocol);
          if (!duration) {
            duration = requestDuration.labels(direction, peer, protocol);
            durations.set(protocol, duration);
          }
          duration.observe(seconds);
        },
      };
      this.recorders.set(key, recorder);
    }
    return recorder;
  }
}

// TCP tunnels, for protocols that are not HTTP (PostgreSQL, Redis, S3 behind TLS, anything): the
// bytes of a connection are carried whole, and the peer's identity is checked once, when the
// connection opens — there is no request to check.
//   tcp.inbound:  mTLS on `listen` (a TlsListener: the same admission, TLS policy, CRL, reload
//                 and closing of revoked peers as the HTTP inbound) → the client's identity
//                 against `allow` → `target`, on loopback.
//   tcp.outbound: a loopback port → a verified mTLS connection to a peer's tcp.inbound, opened by
//                 the same connector as the HTTP outbound (chain, exact identity SAN, pin, and a
//                 session cache of verified servers only).
import net, { type AddressInfo, type Socket } from "node:net";
import type { TLSSocket } from "node:tls";
import { type Config, parseHostPort } from "../config/schema.js";
import { PeerConnector, reportingHooks, type Upstream } from "./connector.js";
import type { Edges } from "./edges.js";
import { type Identity, isRevoked } from "./identity.js";
import type { IdentityChange } from "./identity-store.js";
import type { Logger } from "./log.js";
import type { Direction, Metrics } from "./metrics.js";
import { compileMatcher, type IdentityMatcher, matches, type PeerIdentity } from "./policy.js";
import { clientSecureContext, isTlsFailure, type Verified } from "./tls.js";
import { type Accepted, TlsListener } from "./tls-listener.js";

type InboundSpec = Config["tcp"]["inbound"][number];
const NO_ALPN: readonly string[] = [];
type OutboundSpec = Config["tcp"]["outbound"][number];

export interface TcpDeps {
  config: Config;
  identity: Identity;
  metrics: Metrics;
  logger: Logger;
  edges: Edges;
}

/** One open tunnel: the TLS side, the plain side (the target inbound, the app outbound), who is at the other end. */
interface Tunnel {
  tls: TLSSocket;
  plain: Socket;
  peer: PeerIdentity;
  openedAt: number;
}

/**
 * The open tunnels of one listener and the bytes of the closed ones. Bytes are read from the
 * plain socket's own counters (what the app or target sent and received, the same at both ends
 * of a sidecar pair), at close or at scrape time: nothing is added up per chunk.
 */
class TunnelSet {
  readonly open = new Set<Tunnel>();
  private closedIn = 0;
  private closedOut = 0;

  constructor(
    private readonly direction: Direction,
    listener: string,
    metrics: Metrics,
  ) {
    metrics.countTunnelBytes({ direction, listener, read: () => this.bytes() });
    metrics.openConnections.labels(direction, "tcp").inc(0);
  }

  /** `in` flows from the side that connected: the peer inbound, the app outbound. */
  flows(plain: Socket): { in: number; out: number } {
    const written = plain.bytesWritten ?? 0;
    return this.direction === "inbound" ? { in: written, out: plain.bytesRead } : { in: plain.bytesRead, out: written };
  }

  bytes(): { in: number; out: number } {
    let bytesIn = this.closedIn;
    let bytesOut = this.closedOut;
    for (const t of this.open) {
      const f = this.flows(t.plain);
      bytesIn += f.in;
      bytesOut += f.out;
    }
    return { in: bytesIn, out: bytesOut };
  }

  add(tunnel: Tunnel): void {
    this.open.add(tunnel);
  }

  /** The tunnel's final counts move to the totals; returns them. */
  remove(tunnel: Tunnel): { in: number; out: number } {
    const f = this.flows(tunnel.plain);
    if (this.open.delete(tunnel)) {
      this.closedIn += f.in;
      this.closedOut += f.out;
    }
    return f;
  }

  destroyAll(): void {
    for (const t of this.open) {
      t.tls.destroy();
      t.plain.destroy();
    }
  }
}

/**
 * Carries bytes both ways with backpressure (pipe: a full buffer on one side pauses reading from
 * the other). A side that ends its writing (FIN, or a TLS close_notify) ends the other side's
 * writing only: half-close passes through, so a client may send its request, shut down its
 * sending side and still read the whole answer. An error, or a close before both directions
 * ended (a reset, a revoked peer), destroys the other side too. `done` runs once both closed.
 */
function splice(a: Socket, b: Socket, done: (err: Error | null) => void): void {
  let first: Error | null = null;
  let closed = 0;
  for (const [from, to] of [
    [a, b],
    [b, a],
  ] as const) {
    from.pipe(to);
    from.on("error", (err) => {
      first ??= err;
      to.destroy();
    });
    from.once("close", () => {
      // Closed cleanly means both directions ended; then `to` finishes flushing on its own.
      if (!(from.readableEnded && from.writableFinished)) to.destroy();
      if (++closed === 2) done(first);
    });
  }
}

interface InboundListener {
  spec: InboundSpec;
  allow: IdentityMatcher;
  listener: TlsListener;
  tunnels: TunnelSet;
  target: { host: string; port: number };
  address: AddressInfo | null;
}

interface OutboundListener {
  spec: OutboundSpec;
  server: net.Server;
  tunnels: TunnelSet;
  upstream: Upstream;
  /** Opens verified connections with the current identity; replaced when the identity changes. */
  connector: PeerConnector;
  address: AddressInfo | null;
}

export class TcpListeners {
  private readonly inbound: InboundListener[] = [];
  private readonly outbound: OutboundListener[] = [];
  private identity: Identity;
  /** What the connector verified for each socket it hands over (its callback carries only the socket). */
  private readonly verified = new WeakMap<TLSSocket, Verified>();

  constructor(private readonly deps: TcpDeps) {
    const { config, metrics } = deps;
    this.identity = deps.identity;
    for (const spec of config.tcp.inbound) {
      const entry: InboundListener = {
        spec,
        allow: compileMatcher(spec.allow),
        tunnels: new TunnelSet("inbound", spec.name, metrics),
        target: parseHostPort(spec.target) as { host: string; port: number },
        address: null,
        listener: undefined as unknown as TlsListener,
      };
      entry.listener = new TlsListener({
        name: spec.name,
        config,
        identity: this.identity,
        metrics,
        logger: deps.logger,
        // A tunnel has no request to authorize later: a client without a certificate never passes.
        verifyClient: true,
        protocol: () => "tcp",
        onConnection: (socket, state) => this.onInbound(entry, socket, state),
      });
      this.inbound.push(entry);
    }
    const context = config.tcp.outbound.length > 0 ? clientSecureContext(this.identity, config.tls) : null;
    for (const spec of config.tcp.outbound) {
      const target = parseHostPort(spec.target) as { host: string; port: number };
      const entry: OutboundListener = {
        spec,
        tunnels: new TunnelSet("outbound", spec.name, metrics),
        upstream: {
          identity: spec.identity.toLowerCase(),
          host: target.host,
          port: target.port,
          pin: spec.pin,
          label: `${spec.identity}:${target.port}`,
        },
        address: null,
        server: net.createServer({ allowHalfOpen: true, pauseOnConnect: true, noDelay: true }, (app) =>
          this.onOutbound(entry, app),
        ),
        connector: undefined as unknown as PeerConnector,
      };
      entry.connector = this.connector(entry, context as NonNullable<typeof context>);
      entry.server.maxConnections = config.limits.maxConnections;
      entry.server.on("error", (err) => deps.logger.error({ event: "listener_error", listener: spec.name, err }));
      this.outbound.push(entry);
    }
  }

  async listen(): Promise<Array<{ name: string; direction: Direction; address: AddressInfo }>> {
    const out: Array<{ name: string; direction: Direction; address: AddressInfo }> = [];
    for (const l of this.inbound) {
      l.address = await l.listener.listen(l.spec.listen);
      out.push({ name: l.spec.name, direction: "inbound", address: l.address });
    }
    for (const l of this.outbound) {
      await new Promise<void>((resolve, reject) => {
        l.server.once("error", reject);
        l.server.listen({ host: l.spec.listen.host, port: l.spec.listen.port }, () => {
          l.server.off("error", reject);
          resolve();
        });
      });
      l.address = l.server.address() as AddressInfo;
      out.push({ name: l.spec.name, direction: "outbound", address: l.address });
    }
    return out;
  }

  private onInbound(l: InboundListener, socket: TLSSocket, state: Accepted): void {
    const { metrics, logger, config } = this.deps;
    // Errors before the splice (a reset while the target connects) must not go unhandled.
    socket.on("error", () => undefined);
    const name = l.spec.name;
    const started = performance.now();
    if (state.kind !== "verified" || !matches(l.allow, state.peer.names)) {
      // Refused before a connection to the target is even attempted: the server sees nothing.
      const identity = state.kind === "verified" ? state.peer.primary : "unauthenticated";
      metrics.authzDenied.inc({ identity, route: name });
      metrics.recorder("inbound", identity).record("tcp", 403, 0);
      logger.info({
        event: "authz_denied",
        direction: "inbound",
        listener: name,
        identity,
        route: name,
        reason: "not_allowed",
        remote_addr: socket.remoteAddress,
      });
      socket.destroy();
      return;
    }
    const peer = state.peer;
    // A tunnel counts once in the request series, when it is made (as a CONNECT tunnel does).
    const recorder = metrics.recorder("inbound", peer.primary);
    const record = (code: number) => recorder.record("tcp", code, (performance.now() - started) / 1000);
    socket.allowHalfOpen = true; // read dynamically by Node's streams: a FIN from the client ends one direction only
    socket.setKeepAlive(true, config.limits.tcpKeepAliveMs);
    this.deps.edges
      .edge(
        {
          direction: "inbound",
          src: socket.remoteAddress ?? "unknown",
          dst: `${config.service.name}/${name}`,
          src_identity: peer.primary,
          dst_identity: this.identity.server.summary.identity,
        },
        { version: state.version, cipher: state.cipher },
      )
      .hit();
    // Until the target answers, the TLS socket is not read: what the client sends waits in its buffers.
    const target = net.connect({ ...l.target, allowHalfOpen: true, noDelay: true });
    let connected = false;
    const timer = setTimeout(
      () => target.destroy(Object.assign(new Error("connect timeout"), { code: "ETIMEDOUT" })),
      config.limits.connectTimeoutMs,
    );
    target.once("error", (err: NodeJS.ErrnoException) => {
      if (connected) return; // the splice handles it
      clearTimeout(timer);
      record(err.code === "ETIMEDOUT" ? 504 : 502);
      logger.warn({
        event: "tcp_connect_failed",
        direction: "inbound",
        listener: name,
        target: l.spec.target,
        identity: peer.primary,
        reason: err.code ?? "other",
        detail: err.message,
      });
      socket.destroy();
    });
    socket.once("close", () => {
      if (!connected) target.destroy();
    });
    target.once("connect", () => {
      connected = true;
      clearTimeout(timer);
      if (socket.destroyed) {
        target.destroy();
        return;
      }
      target.setKeepAlive(true, config.limits.tcpKeepAliveMs);
      record(200);
      this.open(l.tunnels, "inbound", name, { tls: socket, plain: target, peer, openedAt: performance.now() });
    });
  }

  private onOutbound(l: OutboundListener, app: Socket): void {
    const { logger, metrics } = this.deps;
    app.on("error", () => undefined);
    const name = l.spec.name;
    const started = performance.now();
    // The identity is the configuration's: one label per listener, made or not.
    const record = (code: number) =>
      metrics.recorder("outbound", l.upstream.identity).record("tcp", code, (performance.now() - started) / 1000);
    // No ALPN: the bytes are the app's own protocol, nothing the peer's sidecar parses.
    l.connector.connect(NO_ALPN).then(
      (tls) => {
        const state = this.verified.get(tls);
        if (app.destroyed || !state) {
          tls.destroy();
          return;
        }
        tls.on("error", () => undefined);
        tls.allowHalfOpen = true;
        record(200);
        this.open(l.tunnels, "outbound", name, { tls, plain: app, peer: state.peer, openedAt: performance.now() });
        app.resume();
      },
      (err: Error) => {
        record((err as NodeJS.ErrnoException).code === "UND_ERR_CONNECT_TIMEOUT" ? 504 : 502);
        if (!isTlsFailure(err)) {
          logger.warn({
            event: "tcp_connect_failed",
            direction: "outbound",
            listener: name,
            target: l.spec.target,
            identity: l.upstream.identity,
            reason: (err as NodeJS.ErrnoException).code ?? "other",
            detail: err.message,
          });
        }
        // A reset, not a clean close: the app must not take "no tunnel" for an empty answer.
        app.resetAndDestroy();
      },
    );
  }

  /** Starts carrying bytes; the tunnel is tracked until both of its sockets have closed. */
  private open(tunnels: TunnelSet, direction: Direction, listener: string, tunnel: Tunnel): void {
    tunnels.add(tunnel);
    splice(tunnel.tls, tunnel.plain, (err) => {
      const bytes = tunnels.remove(tunnel);
      this.deps.logger.debug({
        event: "tcp_tunnel_closed",
        direction,
        listener,
        identity: tunnel.peer.primary,
        bytes_in: bytes.in,
        bytes_out: bytes.out,
        duration_ms: Math.round(performance.now() - tunnel.openedAt),
        ...(err ? { reason: (err as NodeJS.ErrnoException).code ?? err.message } : {}),
      });
    });
  }

  /** The connector of one tcp.outbound listener for the current identity, with its metrics and log lines. */
  private connector(l: OutboundListener, context: ReturnType<typeof clientSecureContext>): PeerConnector {
    const { metrics, logger, config, edges } = this.deps;
    const identity = this.identity;
    const { upstream, spec } = l;
    return new PeerConnector(
      upstream,
      context,
      identity.ca.certs,
      reportingHooks(upstream, identity, { metrics, logger }, { listener: spec.name }, (socket, state) => {
        this.verified.set(socket, state);
        metrics.trackConnection("outbound", "tcp", socket);
        edges
          .edge(
            {
              direction: "outbound",
              src: `${config.service.name}/${spec.name}`,
              dst: `${upstream.host}:${upstream.port}`,
              src_identity: identity.client.summary.identity,
              dst_identity: upstream.identity,
            },
            { version: state.version, cipher: state.cipher },
          )
          .hit();
      }),
      config.limits,
    );
  }

  /**
   * A new identity. Inbound, each TlsListener takes it for new handshakes and closes connections
   * of peers it no longer trusts. Outbound, new tunnels use a new client context and session cache
   * (no session of the old trust is resumed); open tunnels keep theirs, except those to a server
   * the new CRL revokes, which are closed as the inbound closes a revoked client's.
   */
  applyIdentity(change: IdentityChange): void {
    this.identity = change.next;
    for (const l of this.inbound) l.listener.applyIdentity(change);
    if (this.outbound.length === 0) return;
    const context = clientSecureContext(change.next, this.deps.config.tls);
    for (const l of this.outbound) {
      l.connector = this.connector(l, context);
      if (!change.trustChanged) continue;
      for (const t of l.tunnels.open) {
        if (!isRevoked(change.next, t.peer.serial)) continue;
        this.deps.metrics.revokedConnections.inc({ direction: "outbound" });
        this.deps.logger.warn({
          event: "mtls_connection_revoked",
          direction: "outbound",
          listener: l.spec.name,
          identity: t.peer.primary,
          serial: t.peer.serial,
          remote_addr: `${l.upstream.host}:${l.upstream.port}`,
        });
        t.tls.destroy();
      }
    }
  }

  get openTunnels(): number {
    let n = 0;
    for (const l of [...this.inbound, ...this.outbound]) n += l.tunnels.open.size;
    return n;
  }

  status(): { inbound: unknown[]; outbound: unknown[] } {
    const address = (a: AddressInfo | null) =>
      a ? (a.family === "IPv6" ? `[${a.address}]:${a.port}` : `${a.address}:${a.port}`) : null;
    return {
      inbound: this.inbound.map((l) => ({
        name: l.spec.name,
        address: address(l.address),
        target: l.spec.target,
        allow: l.spec.allow,
        open_tunnels: l.tunnels.open.size,
      })),
      outbound: this.outbound.map((l) => ({
        name: l.spec.name,
        address: address(l.address),
        target: l.spec.target,
        identity: l.upstream.identity,
        pinned: l.spec.pin !== null,
        open_tunnels: l.tunnels.open.size,
      })),
    };
  }

  /**
   * SIGTERM: stop accepting, let open tunnels finish on their own until `deadline`, then close
   * what is left. A tunnel has no request boundary at which to stop it more politely.
   */
  async drain(deadline: number): Promise<void> {
    const closed = Promise.all([
      ...this.inbound.map((l) => l.listener.stopAccepting()),
      ...this.outbound.map((l) => new Promise<void>((resolve) => l.server.close(() => resolve()))),
    ]);
    const timer = new Promise<void>((resolve) => setTimeout(resolve, Math.max(0, deadline - Date.now())).unref());
    await Promise.race([closed, timer]);
    await this.close();
  }

  async close(): Promise<void> {
    for (const l of [...this.inbound, ...this.outbound]) l.tunnels.destroyAll();
    for (const l of this.inbound) l.listener.destroyAll();
    await Promise.all([
      ...this.inbound.map((l) => l.listener.stopAccepting()),
      ...this.outbound.map((l) => new Promise<void>((resolve) => l.server.close(() => resolve()))),
    ]);
  }
}

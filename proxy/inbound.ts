// The inbound proxy terminates mutual TLS from other services of the mesh and forwards plain
// HTTP to the local application. Nothing reaches the application from a connection whose client
// certificate did not verify: such sockets are destroyed before an HTTP parser ever sees them.
import { randomBytes } from "node:crypto";
import http, { type IncomingMessage, type ServerResponse } from "node:http";
import type { AddressInfo, Socket } from "node:net";
import tls, { type TLSSocket } from "node:tls";
import { Pool } from "undici";
import type { Config } from "../config/schema.js";
import type { EdgeCounter, Edges } from "./edges.js";
import { answerClientError, ProxyError, sendError, writeSocketError } from "./errors.js";
import { forward, forwardRequestHeaders } from "./forward.js";
import { PendingHandshakes } from "./handshakes.js";
import { type Identity, isRevoked } from "./identity.js";
import type { IdentityChange } from "./identity-store.js";
import type { Logger } from "./log.js";
import type { Metrics, RequestRecorder } from "./metrics.js";
import { authorize, compilePolicy, type Policy } from "./policy.js";
import { classifyInbound, failureReason, type PeerTls, serverTlsOptions } from "./tls.js";
import { chainToCa, sha256Of } from "./x509.js";
import { XFCC, xfccValue } from "./xfcc.js";

/** What a verified (or, with verifyClient: false, unauthenticated) connection carries. */
interface Connection {
  tls: Extract<PeerTls, { kind: "verified" | "unauthenticated" }>;
  label: string;
  xfcc: string[];
  recorder: RequestRecorder;
  edge: EdgeCounter;
}

const kConnection = Symbol("ashmesh.connection");
type InboundSocket = TLSSocket & { [kConnection]?: Connection };

export interface InboundDeps {
  config: Config;
  identity: Identity;
  metrics: Metrics;
  logger: Logger;
  edges: Edges;
}

export class Inbound {
  private readonly tlsServer: tls.Server;
  private readonly httpServer: http.Server;
  private readonly app: Pool;
  private readonly policy: Policy;
  private readonly connections = new Set<InboundSocket>();
  private readonly handshakes = new PendingHandshakes();
  private identity: Identity;
  private draining = false;

  constructor(private readonly deps: InboundDeps) {
    const { config } = deps;
    this.identity = deps.identity;
    this.policy = compilePolicy(config.inbound);
    this.app = new Pool(config.inbound.app, {
      connections: config.limits.upstreamConnections,
      keepAliveTimeout: config.limits.upstreamKeepAliveMs,
      headersTimeout: config.limits.upstreamTimeoutMs,
      bodyTimeout: config.limits.upstreamTimeoutMs,
      connect: { timeout: config.limits.connectTimeoutMs },
    });

    this.tlsServer = tls.createServer({
      ...serverTlsOptions(this.identity, config.tls),
      // Every client is asked for a certificate; the decision is classifyInbound's, so that a
      // refusal is counted and logged with its real reason.
      requestCert: true,
      rejectUnauthorized: false,
      handshakeTimeout: config.limits.headersTimeoutMs,
      ticketKeys: randomBytes(48),
      noDelay: true,
    } as tls.TlsOptions);
    this.tlsServer.maxConnections = config.limits.maxConnections;

    this.httpServer = http.createServer(
      {
        keepAliveTimeout: config.limits.idleTimeoutMs,
        headersTimeout: config.limits.headersTimeoutMs,
        requestTimeout: config.limits.requestTimeoutMs,
      },
      (req, res) => this.onRequest(req, res),
    );
    // Clients that speak HTTP upgrade (WebSocket) are not proxied yet: answer instead of hanging.
    this.httpServer.on("upgrade", (_req, socket: Socket) => {
      writeSocketError(socket, new ProxyError("not_implemented", "HTTP upgrade (WebSocket) is not proxied"));
    });
    this.httpServer.on("clientError", answerClientError);

    this.tlsServer.on("connection", (raw: Socket) => this.handshakes.accepted(raw));
    this.tlsServer.on("secureConnection", (socket: InboundSocket) => this.onSecureConnection(socket));
    this.tlsServer.on("tlsClientError", (err: NodeJS.ErrnoException, socket: TLSSocket) =>
      this.onTlsError(err, socket),
    );
    this.tlsServer.on("error", (err) => deps.logger.error({ event: "listener_error", listener: "inbound", err }));
  }

  get openConnections(): number {
    return this.connections.size;
  }

  /** Listens on inbound.listen, or on `fd` when systemd handed over the socket. */
  async listen(fd?: number): Promise<AddressInfo> {
    const { host, port } = this.deps.config.inbound.listen;
    await new Promise<void>((resolve, reject) => {
      this.tlsServer.once("error", reject);
      this.tlsServer.listen(fd === undefined ? { port, host } : { fd }, () => {
        this.tlsServer.off("error", reject);
        resolve();
      });
    });
    // The HTTP server never listens itself; this starts its request/headers timeout checks.
    this.httpServer.emit("listening");
    return this.tlsServer.address() as AddressInfo;
  }

  address(): AddressInfo | null {
    return this.tlsServer.address() as AddressInfo | null;
  }

  private onSecureConnection(socket: InboundSocket): void {
    const { metrics, logger, config } = this.deps;
    const seconds = this.handshakes.settled(socket);
    const state = classifyInbound(socket, config.inbound.verifyClient, this.identity.ca.certs);
    const remote = socket.remoteAddress ?? "unknown";
    if (state.kind === "refused") {
      metrics.handshakeFailed("inbound", state.reason);
      logger.warn({
        event: "mtls_handshake_failed",
        direction: "inbound",
        reason: state.reason,
        detail: state.detail,
        client_cn: state.subject,
        remote_addr: remote,
      });
      socket.destroy();
      return;
    }
    metrics.handshakeOk("inbound", seconds ?? 0);
    const ours = this.identity.server.summary.identity;
    const label = state.kind === "verified" ? state.peer.primary : "unauthenticated";
    const connection: Connection = {
      tls: state,
      label,
      xfcc: state.kind === "verified" ? [XFCC, xfccValue(this.identity.server.peer.uris[0] ?? ours, state.peer)] : [],
      recorder: metrics.recorder("inbound", label),
      edge: this.deps.edges.edge(
        {
          direction: "inbound",
          src: remote,
          dst: config.service.name,
          src_identity: label,
          dst_identity: ours,
        },
        { version: state.version, cipher: state.cipher },
      ),
    };
    socket[kConnection] = connection;
    this.connections.add(socket);
    metrics.openConnections.inc({ direction: "inbound" });
    socket.once("close", () => {
      this.connections.delete(socket);
      metrics.openConnections.dec({ direction: "inbound" });
    });
    logger.info({
      event: "mtls_handshake_complete",
      client_cn: state.kind === "verified" ? (state.peer.commonName ?? state.peer.primary) : null,
      server_cn: this.identity.server.peer.commonName ?? ours,
      tls_version: state.version,
      cipher_suite: state.cipher,
      direction: "inbound",
      remote_addr: remote,
      resumed: state.resumed,
      ...(state.kind === "unauthenticated" ? { unauthenticated: true } : {}),
    });
    this.httpServer.emit("connection", socket);
  }

  private onTlsError(err: NodeJS.ErrnoException, socket: TLSSocket): void {
    this.handshakes.settled(socket);
    // A TCP connect that sends nothing (a port probe, a health check) is not a handshake.
    if (err.code === "ECONNRESET" && socket.bytesRead === 0) return;
    const reason = failureReason(err.code);
    this.deps.metrics.handshakeFailed("inbound", reason);
    this.deps.logger.warn({
      event: "mtls_handshake_failed",
      direction: "inbound",
      reason,
      detail: err.code ?? err.message,
      remote_addr: socket.remoteAddress ?? "unknown",
    });
  }

  private onRequest(req: IncomingMessage, res: ServerResponse): void {
    const started = performance.now();
    const socket = req.socket as InboundSocket;
    const connection = socket[kConnection];
    if (!connection) {
      // Unreachable by construction (only classified sockets are handed to the HTTP server).
      socket.destroy();
      return;
    }
    const url = req.url ?? "/";
    const done = (status: number) => {
      connection.recorder.record(status, (performance.now() - started) / 1000);
      connection.edge.hit();
    };
    if (url.charCodeAt(0) !== 47 /* / */) {
      sendError(res, new ProxyError("bad_request", "inbound expects origin-form request targets (/path)"));
      done(400);
      return;
    }
    if (this.draining) res.shouldKeepAlive = false;
    const query = url.indexOf("?");
    const path = query === -1 ? url : url.slice(0, query);
    const peer = connection.tls.kind === "verified" ? connection.tls.peer : null;
    const decision = authorize(this.policy, peer, req.method ?? "GET", path);
    if (!decision.allowed) {
      if (decision.reason === "non_canonical_path") {
        sendError(
          res,
          new ProxyError("non_canonical_path", `the path ${JSON.stringify(path)} is not in canonical form`),
        );
        done(400);
        return;
      }
      this.deps.metrics.authzDenied.inc({ identity: connection.label, route: decision.route });
      this.deps.logger.info({
        event: "authz_denied",
        identity: connection.label,
        route: decision.route,
        method: req.method,
        path,
        reason: decision.reason,
      });
      sendError(
        res,
        new ProxyError(
          "forbidden",
          `${connection.label} may not call ${req.method} ${path} on ${this.deps.config.service.dnsName}`,
          {
            identity: connection.label,
            route: decision.route,
          },
        ),
      );
      done(403);
      return;
    }
    forward(req, res, {
      dispatcher: this.app,
      target: this.deps.config.inbound.app,
      side: "app",
      path: url,
      headers: forwardRequestHeaders(req.rawHeaders, req.headers.connection, connection.xfcc),
      timeoutMs: this.deps.config.limits.upstreamTimeoutMs,
      done,
    });
  }

  /**
   * A new identity: new handshakes use it; open connections keep theirs. When trust changed
   * (CA bundle or CRL), ticket keys rotate so no earlier session resumes, and open connections
   * whose peer is now revoked, or whose CA is no longer trusted, are closed.
   */
  applyIdentity(change: IdentityChange): void {
    this.identity = change.next;
    const options: tls.SecureContextOptions & { ticketKeys?: Buffer } = serverTlsOptions(
      change.next,
      this.deps.config.tls,
    );
    // setSecureContext makes fresh ticket keys; keep the old ones unless trust changed, so a
    // plain certificate rotation does not force every client into a full handshake.
    options.ticketKeys = change.trustChanged ? randomBytes(48) : this.tlsServer.getTicketKeys();
    this.tlsServer.setSecureContext(options);
    if (change.trustChanged) this.closeUntrusted(change.previous, change.next);
  }

  private closeUntrusted(previous: Identity, next: Identity): void {
    const trusted = new Set(next.ca.summaries.map((s) => s.sha256));
    for (const socket of this.connections) {
      const connection = socket[kConnection];
      if (connection?.tls.kind !== "verified") continue;
      const { peer, cert } = connection.tls;
      let reason: "revoked" | "ca_no_longer_trusted" | null = null;
      if (isRevoked(next, peer.serial)) reason = "revoked";
      else {
        // The CA the peer chained to directly; peers behind intermediates keep their connection.
        const anchor = cert && chainToCa(cert, [], previous.ca.certs);
        if (anchor && !trusted.has(sha256Of(anchor))) reason = "ca_no_longer_trusted";
      }
      if (!reason) continue;
      if (reason === "revoked") this.deps.metrics.revokedConnections.inc({ direction: "inbound" });
      this.deps.logger.warn({
        event: reason === "revoked" ? "mtls_connection_revoked" : "mtls_connection_untrusted",
        direction: "inbound",
        identity: connection.label,
        serial: peer.serial,
        remote_addr: socket.remoteAddress,
      });
      socket.destroy();
    }
  }

  /** Stops accepting; idle keep-alive connections close now, busy ones after their response. */
  async drain(deadline: number): Promise<void> {
    this.draining = true;
    const closed = new Promise<void>((resolve) => this.tlsServer.close(() => resolve()));
    this.httpServer.closeIdleConnections();
    const poll = setInterval(() => this.httpServer.closeIdleConnections(), 50);
    const timer = new Promise<void>((resolve) => setTimeout(resolve, Math.max(0, deadline - Date.now())).unref());
    await Promise.race([closed, timer]);
    clearInterval(poll);
    for (const socket of this.connections) socket.destroy();
    await this.app.close().catch(() => undefined);
  }

  async close(): Promise<void> {
    for (const socket of this.connections) socket.destroy();
    this.httpServer.closeAllConnections();
    await new Promise<void>((resolve) => this.tlsServer.close(() => resolve()));
    this.httpServer.close();
    await this.app.destroy().catch(() => undefined);
  }
}

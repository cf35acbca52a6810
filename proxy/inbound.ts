// The inbound proxy terminates mutual TLS from other services of the mesh and forwards plain
// HTTP to the local application. Nothing reaches the application from a connection whose client
// certificate did not verify: such sockets are destroyed before an HTTP parser ever sees them.
import http, { type IncomingMessage, type ServerResponse } from "node:http";
import type { AddressInfo, Socket } from "node:net";
import type { TLSSocket } from "node:tls";
import { Pool } from "undici";
import type { Config } from "../config/schema.js";
import type { ChallengeResponder } from "./acme-challenge.js";
import type { EdgeCounter, Edges } from "./edges.js";
import { answerClientError, ProxyError, sendError, writeSocketError } from "./errors.js";
import { forward, forwardRequestHeaders, refuseRequest } from "./forward.js";
import type { Identity } from "./identity.js";
import type { IdentityChange } from "./identity-store.js";
import type { Logger } from "./log.js";
import type { Metrics, RequestRecorder } from "./metrics.js";
import { authorize, compilePolicy, type Policy } from "./policy.js";
import { type Accepted, TlsListener } from "./tls-listener.js";
import { XFCC, xfccValue } from "./xfcc.js";

/** What a verified (or, with verifyClient: false, unauthenticated) connection carries. */
interface Connection {
  tls: Accepted;
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
  /** ACME's challenge responder, when tls-alpn-01 is answered on this listener. */
  acme?: ChallengeResponder | null;
}

export class Inbound {
  private readonly listener: TlsListener;
  private readonly httpServer: http.Server;
  private readonly app: Pool;
  private readonly policy: Policy;
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
    this.listener = new TlsListener({
      name: "inbound",
      config,
      identity: this.identity,
      metrics: deps.metrics,
      logger: deps.logger,
      verifyClient: config.inbound.verifyClient,
      acme: deps.acme ?? null,
      onConnection: (socket, state) => this.onConnection(socket, state),
    });
    this.httpServer = http.createServer(
      {
        keepAliveTimeout: config.limits.idleTimeoutMs,
        headersTimeout: config.limits.headersTimeoutMs,
        requestTimeout: config.limits.requestTimeoutMs,
        maxHeaderSize: config.limits.maxHeaderBytes,
      },
      (req, res) => this.onRequest(req, res),
    );
    // Node drops header lines past maxHeadersCount without a word; refuseRequest counts them instead.
    this.httpServer.maxHeadersCount = 0;
    // Clients that speak HTTP upgrade (WebSocket) are not proxied yet: answer instead of hanging.
    this.httpServer.on("upgrade", (_req, socket: Socket) => {
      writeSocketError(socket, new ProxyError("not_implemented", "HTTP upgrade (WebSocket) is not proxied"));
    });
    this.httpServer.on("clientError", (err: NodeJS.ErrnoException, socket: InboundSocket) => {
      const status = answerClientError(err, socket);
      if (status) socket[kConnection]?.recorder.record(status, 0);
    });
  }

  get openConnections(): number {
    return this.listener.openConnections;
  }

  /** Listens on inbound.listen, or on `fd` when systemd handed over the socket. */
  async listen(fd?: number): Promise<AddressInfo> {
    const address = await this.listener.listen(this.deps.config.inbound.listen, fd);
    // The HTTP server never listens itself; this starts its request/headers timeout checks.
    this.httpServer.emit("listening");
    return address;
  }

  private onConnection(socket: InboundSocket, state: Accepted): void {
    const { metrics, config } = this.deps;
    const ours = this.identity.server.summary.identity;
    const label = state.kind === "verified" ? state.peer.primary : "unauthenticated";
    socket[kConnection] = {
      tls: state,
      label,
      xfcc: state.kind === "verified" ? [XFCC, xfccValue(this.identity.server.peer.uris[0] ?? ours, state.peer)] : [],
      recorder: metrics.recorder("inbound", label),
      edge: this.deps.edges.edge(
        {
          direction: "inbound",
          src: socket.remoteAddress ?? "unknown",
          dst: config.service.name,
          src_identity: label,
          dst_identity: ours,
        },
        { version: state.version, cipher: state.cipher },
      ),
    };
    this.httpServer.emit("connection", socket);
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
    const refused =
      refuseRequest(req, this.deps.config.limits) ??
      (url.charCodeAt(0) !== 47 /* / */
        ? new ProxyError("bad_request", "inbound expects origin-form request targets (/path)")
        : null);
    if (refused) {
      // The body, if any, is not read: nothing after a refused head may be taken as a request.
      res.shouldKeepAlive = false;
      sendError(res, refused);
      done(refused.status);
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

  /** A new identity: the listener takes it for new handshakes and closes connections it no longer trusts. */
  applyIdentity(change: IdentityChange): void {
    this.identity = change.next;
    this.listener.applyIdentity(change);
  }

  /** Stops accepting; idle keep-alive connections close now, busy ones after their response. */
  async drain(deadline: number): Promise<void> {
    this.draining = true;
    const closed = this.listener.stopAccepting();
    this.httpServer.closeIdleConnections();
    const poll = setInterval(() => this.httpServer.closeIdleConnections(), 50);
    const timer = new Promise<void>((resolve) => setTimeout(resolve, Math.max(0, deadline - Date.now())).unref());
    await Promise.race([closed, timer]);
    clearInterval(poll);
    this.listener.destroyAll();
    await this.app.close().catch(() => undefined);
  }

  async close(): Promise<void> {
    this.listener.destroyAll();
    this.httpServer.closeAllConnections();
    await this.listener.stopAccepting();
    this.httpServer.close();
    await this.app.destroy().catch(() => undefined);
  }
}

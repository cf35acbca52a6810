// The outbound proxy carries the local application's plain calls to other services of the mesh
// over mutual TLS: as a forward proxy (HTTP_PROXY, absolute-form requests, and CONNECT tunnels for
// clients such as grpc-js that use grpc_proxy) limited to the configured destinations, and on
// port-mapped listeners fixed to one upstream each. Every listener takes HTTP/1.1 and HTTP/2
// cleartext with prior knowledge (gRPC clients). It binds to loopback only, presents our client
// certificate, prefers HTTP/2 to a peer (one multiplexed connection), and accepts a server only
// when its certificate names the identity the request was meant for (and matches the pin).
import http, { type IncomingMessage } from "node:http";
import http2 from "node:http2";
import net, { type AddressInfo, isIP, type Socket } from "node:net";
import type { SecureContext, TLSSocket } from "node:tls";
import { Pool } from "undici";
import type { Config } from "../config/schema.js";
import { parseHostPort } from "../config/schema.js";
import { PeerConnector, reportingHooks, type Upstream } from "./connector.js";
import type { EdgeCounter, Edges } from "./edges.js";
import { answerClientError, fromUpstreamError, ProxyError, sendError, writeSocketError } from "./errors.js";
import {
  authorityOf,
  closeAfter,
  forward,
  forwardRequestHeaders,
  isGrpc,
  protocolOf,
  refuseRequest,
  type ServerReply,
  type ServerRequest,
} from "./forward.js";
import type { Identity } from "./identity.js";
import type { IdentityChange } from "./identity-store.js";
import type { Logger } from "./log.js";
import type { Metrics, Protocol, RequestRecorder } from "./metrics.js";
import { compileMatcher, type IdentityMatcher, matchesName } from "./policy.js";
import { clientSecureContext } from "./tls.js";
import { Http1Transport, PeerTransport } from "./transport.js";
import { tunnel, upgradeHead } from "./upgrade.js";

interface Route {
  upstream: Upstream;
  connector: PeerConnector;
  transport: PeerTransport;
  /**
   * The route's metrics and edge. A configured upstream or an exact `destinations` entry has them
   * from the start: the configuration bounds them. A name that only matched a wildcard gets them
   * once a server proved that identity: until then it is only a name the app asked for, and a
   * label per such name would let an app (or a typo loop) grow the metrics, /edges and the pools
   * without bound (DESIGN §4: labels stay bounded).
   */
  labels: { recorder: RequestRecorder; edge: EdgeCounter } | null;
}

/** The connections and the client context of one identity; replaced whole when the identity changes. */
interface Generation {
  context: SecureContext;
  /** Keyed by what makes a connection (routeKey): the forward proxy and a mapped port share one. */
  routes: Map<string, Route>;
}

export interface OutboundDeps {
  config: Config;
  identity: Identity;
  metrics: Metrics;
  logger: Logger;
  edges: Edges;
}

/** "http://host:port/p?q" → "/p?q". */
function originForm(target: string): string {
  const scheme = target.indexOf("://");
  if (scheme === -1) return `/${target}`;
  const slash = target.indexOf("/", scheme + 3);
  return slash === -1 ? "/" : target.slice(slash);
}

/** Upstreams with the same identity, address and pin share their connections. */
function routeKey(u: Upstream): string {
  return `${u.identity}\u0000${u.host}\u0000${u.port}\u0000${u.pin ?? ""}`;
}

/**
 * A connection that starts with HTTP/2's preface (RFC 9113 §3.4: "PRI * HTTP/2.0…"): a client
 * with prior knowledge. No HTTP/1.1 method is PRI, so four bytes tell.
 */
function priorKnowledge(first: Buffer): boolean {
  return first.length >= 4 && first.toString("latin1", 0, 4) === "PRI ";
}

/** One loopback listener: HTTP/1.1 and HTTP/2 cleartext, told apart by the connection preface. */
interface Listener {
  name: string;
  net: net.Server;
  h1: http.Server;
  h2: http2.Http2Server;
  sessions: Set<http2.ServerHttp2Session>;
}

export class Outbound {
  private readonly listeners: Listener[] = [];
  private readonly destinations: IdentityMatcher;
  /** Names the configuration itself bounds: `destinations` entries without a wildcard, `resolve` keys. */
  private readonly exactDestinations: Set<string>;
  private generation: Generation;
  private retired: Generation[] = [];
  private identity: Identity;
  private draining = false;
  /** Requests to wildcard destinations no server has proved (see Route.labels): one label. */
  private readonly unverified: RequestRecorder;
  private readonly upstreams = new Map<string, Upstream>();

  constructor(private readonly deps: OutboundDeps) {
    this.identity = deps.identity;
    this.unverified = deps.metrics.recorder("outbound", "unverified");
    this.destinations = compileMatcher(deps.config.outbound.destinations);
    this.exactDestinations = new Set(
      [
        ...deps.config.outbound.destinations.filter((d) => !d.includes("*")),
        ...Object.keys(deps.config.outbound.resolve),
      ].map((d) => d.toLowerCase()),
    );
    this.generation = this.newGeneration(deps.identity);
    const { outbound } = deps.config;
    if (outbound.listen) this.listeners.push(this.createListener("forward proxy", null));
    for (const [name, spec] of Object.entries(outbound.upstreams)) {
      const target = parseHostPort(spec.target) as { host: string; port: number };
      const upstream = this.upstreamFor(spec.identity ?? target.host.toLowerCase(), target.port, spec.pin, target.host);
      this.listeners.push(this.createListener(`upstream ${name}`, upstream));
    }
  }

  private newGeneration(identity: Identity): Generation {
    return { context: clientSecureContext(identity, this.deps.config.tls), routes: new Map() };
  }

  /**
   * The upstream for a peer identity reached at `connectHost` (default: the identity itself).
   * `resolve` rewrites the address of the host connected to, as curl --resolve does: never the
   * identity a server must prove (config/load.ts refuses a resolve entry that would look like it).
   */
  private upstreamFor(identity: string, port: number, pin: string | null, connectHost?: string): Upstream {
    let host = connectHost ?? identity;
    const override = this.deps.config.outbound.resolve[host.toLowerCase()];
    if (override) {
      const parsed = isIP(override) ? { host: override, port } : parseHostPort(override);
      if (parsed) {
        host = parsed.host;
        port = parsed.port;
      }
    }
    return { identity, host, port, pin, label: `${identity}:${port}` };
  }

  private createListener(name: string, fixed: Upstream | null): Listener {
    const { limits } = this.deps.config;
    const h1 = http.createServer(
      {
        keepAliveTimeout: limits.idleTimeoutMs,
        headersTimeout: limits.headersTimeoutMs,
        requestTimeout: limits.requestTimeoutMs,
        maxHeaderSize: limits.maxHeaderBytes,
        noDelay: true,
      },
      (req, res) => this.onRequest(req, res, fixed),
    );
    // Node drops header lines past maxHeadersCount without a word; refuseRequest counts them instead.
    h1.maxHeadersCount = 0;
    h1.on("connect", (req: IncomingMessage, socket: Socket, head: Buffer) => this.onConnect(req, socket, head, fixed));
    h1.on("upgrade", (req: IncomingMessage, socket: Socket, head: Buffer) => this.onUpgrade(req, socket, head, fixed));
    h1.on("clientError", (err: NodeJS.ErrnoException, socket: Socket) => {
      const status = answerClientError(err, socket);
      if (status) this.unverified.record("http1", status, 0);
    });
    const h2 = http2.createServer(
      {
        maxHeaderListPairs: limits.maxRequestHeaders + 8,
        settings: { maxHeaderListSize: limits.maxHeaderBytes },
      },
      (req, res) => this.onRequest(req, res, fixed),
    );
    h2.setTimeout(limits.idleTimeoutMs);
    const sessions = new Set<http2.ServerHttp2Session>();
    h2.on("session", (session: http2.ServerHttp2Session) => {
      sessions.add(session);
      session.once("close", () => sessions.delete(session));
      if (this.draining) session.close();
    });
    const server = net.createServer({ noDelay: true, pauseOnConnect: true }, (socket) => {
      socket.on("error", () => socket.destroy());
      socket.once("data", (first: Buffer) => {
        socket.pause();
        socket.unshift(first);
        (priorKnowledge(first) ? h2 : h1).emit("connection", socket);
        process.nextTick(() => socket.resume());
      });
      socket.resume();
    });
    server.maxConnections = limits.maxConnections;
    return { name, net: server, h1, h2, sessions };
  }

  /** Listens on each configured address; the forward proxy on `forwardFd` when systemd handed it over. */
  async listen(forwardFd?: number): Promise<Array<{ name: string; address: AddressInfo }>> {
    const { outbound } = this.deps.config;
    const addresses = [
      ...(outbound.listen ? [outbound.listen] : []),
      ...Object.values(outbound.upstreams).map((u) => u.listen),
    ];
    const out: Array<{ name: string; address: AddressInfo }> = [];
    for (const [i, listener] of this.listeners.entries()) {
      const spec = addresses[i] as { host: string; port: number };
      await new Promise<void>((resolve, reject) => {
        listener.net.once("error", reject);
        const inherited = i === 0 && outbound.listen && forwardFd !== undefined;
        listener.net.listen(inherited ? { fd: forwardFd } : { port: spec.port, host: spec.host }, () => {
          listener.net.off("error", reject);
          resolve();
        });
      });
      listener.h1.emit("listening"); // starts its timeout checks; it never listens itself
      out.push({ name: listener.name, address: listener.net.address() as AddressInfo });
    }
    return out;
  }

  /** The route (connections, metrics, edge) for an upstream in the current generation; made on first use. */
  private route(upstream: Upstream, wildcard: boolean): Route {
    const generation = this.generation;
    const key = routeKey(upstream);
    let route = generation.routes.get(key);
    if (!route) {
      route = this.createRoute(upstream, generation.context);
      generation.routes.set(key, route);
    }
    if (!wildcard) this.labelsOf(route);
    return route;
  }

  /** The recorder and edge of a route, made on first use. */
  private labelsOf(route: Route): { recorder: RequestRecorder; edge: EdgeCounter } {
    if (!route.labels) {
      const { upstream } = route;
      route.labels = {
        recorder: this.deps.metrics.recorder("outbound", upstream.identity),
        edge: this.deps.edges.edge({
          direction: "outbound",
          src: this.deps.config.service.name,
          dst: upstream.label,
          src_identity: this.identity.client.summary.identity,
          dst_identity: upstream.identity,
        }),
      };
    }
    return route.labels;
  }

  private createRoute(upstream: Upstream, context: SecureContext): Route {
    const { limits } = this.deps.config;
    const { metrics } = this.deps;
    const identity = this.identity;
    // The hooks run once the route exists: a handshake is what proves a wildcard name (labelsOf).
    let route: Route | null = null;
    const connector = new PeerConnector(
      upstream,
      context,
      identity.ca.certs,
      reportingHooks(upstream, identity, this.deps, {}, (socket, state) => {
        metrics.trackConnection("outbound", socket.alpnProtocol === "h2" ? "h2" : "http1", socket);
        if (route) this.labelsOf(route).edge.tls(state.version, state.cipher);
      }),
      limits,
    );
    const h1 = new Http1Transport(
      new Pool(`https://${upstream.identity}:${upstream.port}`, {
        connect: connector.undici(),
        connections: limits.upstreamConnections,
        keepAliveTimeout: limits.upstreamKeepAliveMs,
        keepAliveMaxTimeout: limits.idleTimeoutMs,
        headersTimeout: limits.upstreamTimeoutMs,
        bodyTimeout: limits.upstreamTimeoutMs,
      }),
    );
    const transport = new PeerTransport(
      (alpn) => connector.connect(alpn),
      h1,
      `${upstream.identity}:${upstream.port}`,
      limits.idleTimeoutMs,
      this.deps.config.outbound.peerProtocol === "h2",
    );
    route = { upstream, connector, transport, labels: null };
    return route;
  }

  /** Records an exchange on its route, or under peer=unverified (and drops the route) when no server proved it. */
  private recordOn(route: Route, protocol: Protocol, status: number, seconds: number): void {
    if (route.labels) {
      route.labels.recorder.record(protocol, status, seconds);
      route.labels.edge.hit();
      return;
    }
    // A wildcard name no server has proved (it does not resolve, refuses, or failed the
    // handshake): one shared label, and the route is dropped so made-up names cost nothing.
    this.unverified.record(protocol, status, seconds);
    const key = routeKey(route.upstream);
    if (this.generation.routes.get(key) === route) {
      this.generation.routes.delete(key);
      this.upstreams.delete(route.upstream.identity);
      void route.transport.close();
    }
  }

  private onRequest(req: ServerRequest, res: ServerReply, fixed: Upstream | null): void {
    const started = performance.now();
    const protocol = protocolOf(req);
    const grpc = isGrpc(req.headers["content-type"]);
    const refuse = (error: ProxyError) => {
      sendError(res, error, grpc);
      this.unverified.record(protocol, grpc ? 200 : error.status, (performance.now() - started) / 1000);
    };
    const refused = refuseRequest(req, this.deps.config.limits);
    if (refused) {
      // The body, if any, is not read: nothing after a refused head may be taken as a request.
      closeAfter(res);
      refuse(refused);
      return;
    }
    const target = this.targetOf(req, fixed);
    if (target instanceof ProxyError) {
      refuse(target);
      return;
    }
    if (this.draining) closeAfter(res);
    const { upstream, path, authority } = target;
    const route = this.route(upstream, fixed === null && !this.exactDestinations.has(upstream.identity));
    forward(req, res, {
      transport: route.transport,
      target: upstream.label,
      side: "peer",
      path,
      authority,
      headers: forwardRequestHeaders(req.rawHeaders, req.headers.connection),
      timeoutMs: this.deps.config.limits.upstreamTimeoutMs,
      done: (status) => this.recordOn(route, protocol, status, (performance.now() - started) / 1000),
    });
  }

  /** Where a request goes: the listener's upstream, or (forward proxy) the destination it names. */
  private targetOf(
    req: ServerRequest,
    fixed: Upstream | null,
  ): { upstream: Upstream; path: string; authority: string } | ProxyError {
    const url = req.url ?? "/";
    if (fixed) {
      // A server must accept absolute-form too (RFC 9112 §3.2.2); the upstream is fixed anyway.
      return { upstream: fixed, path: url.startsWith("/") ? url : originForm(url), authority: fixed.identity };
    }
    let authority: string;
    let path: string;
    if (url.startsWith("http://")) {
      const slash = url.indexOf("/", 7);
      authority = slash === -1 ? url.slice(7) : url.slice(7, slash);
      path = slash === -1 ? "/" : url.slice(slash);
    } else if (url.startsWith("/")) {
      authority = authorityOf(req);
      path = url;
    } else if (/^https:\/\//i.test(url)) {
      return new ProxyError("bad_request", "call the service over http://; the sidecar adds mutual TLS itself");
    } else {
      return new ProxyError("bad_request", `cannot proxy the request target ${JSON.stringify(url.slice(0, 100))}`);
    }
    const upstream = this.destination(authority);
    return upstream instanceof ProxyError ? upstream : { upstream, path, authority };
  }

  /** The peer for host[:port] named by the app, if `outbound.destinations` allows it. */
  private destination(authority: string): Upstream | ProxyError {
    if (authority.includes("@")) return new ProxyError("bad_request", "credentials in the URL are not forwarded");
    const name = (
      authority.startsWith("[") ? authority.slice(0, authority.indexOf("]") + 1) : (authority.split(":")[0] ?? "")
    )
      .toLowerCase()
      .replace(/\.$/, "");
    if (!name) return new ProxyError("bad_request", "the request names no destination host");
    if (!matchesName(this.destinations, name)) {
      this.deps.logger.info({ event: "destination_denied", destination: name });
      return new ProxyError(
        "destination_not_allowed",
        `${name} is not in outbound.destinations (${this.deps.config.outbound.destinations.join(", ") || "none"})`,
        { destination: name },
      );
    }
    // The port the app wrote is the peer app's own; mesh traffic always goes to the peer's inbound.
    let upstream = this.upstreams.get(name);
    if (!upstream) {
      upstream = this.upstreamFor(name, this.deps.config.outbound.port, null);
      if (this.upstreams.size >= 10_000) this.upstreams.clear();
      this.upstreams.set(name, upstream);
    }
    return upstream;
  }

  /**
   * CONNECT host:port (grpc-js and other clients honouring grpc_proxy/http_proxy): the destination
   * must be allowed; the tunnel goes to the peer's inbound over mTLS, speaking whatever the client
   * speaks inside it (its first bytes tell HTTP/2 from HTTP/1.1, and ALPN says so to the peer).
   */
  private onConnect(req: IncomingMessage, socket: Socket, head: Buffer, fixed: Upstream | null): void {
    const started = performance.now();
    const upstream = fixed ?? this.destination(req.url ?? "");
    if (upstream instanceof ProxyError) {
      writeSocketError(socket, upstream);
      this.unverified.record("http1", upstream.status, 0);
      return;
    }
    socket.write("HTTP/1.1 200 Connection Established\r\n\r\n");
    const start = (first: Buffer) => {
      const h2 = priorKnowledge(first);
      const protocol: Protocol = h2 ? "h2" : "http1";
      const route = this.route(upstream, fixed === null && !this.exactDestinations.has(upstream.identity));
      route.connector.connect([h2 ? "h2" : "http/1.1"]).then(
        (peer: TLSSocket) => {
          if ((peer.alpnProtocol || "http/1.1") !== (h2 ? "h2" : "http/1.1")) {
            peer.destroy();
            socket.destroy();
            this.recordOn(route, protocol, 502, (performance.now() - started) / 1000);
            return;
          }
          this.recordOn(route, protocol, 200, (performance.now() - started) / 1000);
          peer.write(first);
          socket.pipe(peer).pipe(socket);
          const close = () => {
            socket.destroy();
            peer.destroy();
          };
          socket.once("close", close);
          peer.once("close", close);
          socket.on("error", close);
          peer.on("error", close);
        },
        (err: unknown) => {
          socket.destroy();
          this.recordOn(route, protocol, fromUpstreamError(err, "peer", upstream.label).status, 0);
        },
      );
    };
    if (head.length > 0) start(head);
    else socket.once("data", start);
  }

  /** WebSocket and other upgrades from the app: to the destination's inbound over mTLS (HTTP/1.1). */
  private onUpgrade(req: IncomingMessage, socket: Socket, head: Buffer, fixed: Upstream | null): void {
    const started = performance.now();
    const refused = refuseRequest(req, this.deps.config.limits);
    const target = refused ?? this.targetOf(req, fixed);
    if (target instanceof ProxyError) {
      writeSocketError(socket, target);
      this.unverified.record("ws", target.status, 0);
      return;
    }
    const { upstream, path, authority } = target;
    const route = this.route(upstream, fixed === null && !this.exactDestinations.has(upstream.identity));
    route.connector.connect(["http/1.1"]).then(
      (peer) => {
        tunnel(socket, peer, upgradeHead(req, path, authority, []), head, (status) =>
          this.recordOn(route, "ws", status, (performance.now() - started) / 1000),
        );
      },
      (err: unknown) => {
        const error = fromUpstreamError(err, "peer", upstream.label);
        writeSocketError(socket, error);
        this.recordOn(route, "ws", error.status, (performance.now() - started) / 1000);
      },
    );
  }

  /**
   * A new identity (client certificate, CA or CRL): new connections use it at once, through a
   * new generation of routes; the old ones finish their requests (HTTP/2: GOAWAY) and then close.
   */
  applyIdentity(change: IdentityChange): void {
    this.identity = change.next;
    const old = this.generation;
    this.generation = this.newGeneration(change.next);
    this.retired.push(old);
    void Promise.allSettled([...old.routes.values()].map((r) => r.transport.close())).then(() => {
      this.retired = this.retired.filter((g) => g !== old);
    });
  }

  async drain(deadline: number): Promise<void> {
    this.draining = true;
    const closed = Promise.all(this.listeners.map((l) => new Promise<void>((resolve) => l.net.close(() => resolve()))));
    for (const l of this.listeners) {
      l.h1.closeIdleConnections();
      for (const session of l.sessions) session.close(); // GOAWAY: streams in flight finish
    }
    const poll = setInterval(() => {
      for (const l of this.listeners) l.h1.closeIdleConnections();
    }, 50);
    const timer = new Promise<void>((resolve) => setTimeout(resolve, Math.max(0, deadline - Date.now())).unref());
    await Promise.race([closed, timer]);
    clearInterval(poll);
    await this.close();
  }

  async close(): Promise<void> {
    for (const l of this.listeners) {
      l.h1.closeAllConnections();
      for (const session of l.sessions) session.destroy();
      l.net.close();
    }
    const routes = [this.generation, ...this.retired].flatMap((g) => [...g.routes.values()]);
    await Promise.allSettled(routes.map((r) => r.transport.destroy()));
  }
}

// Answers the ACME CA's challenges, and nothing else: tls-alpn-01 (RFC 8737) on the inbound port
// and http-01 (RFC 8555 §8.3) on an optional port of its own. The inbound listener hands over a
// connection whose ClientHello offers ALPN "acme-tls/1" (tls-listener.ts); it reaches a TLS server
// of its own that only ever presents the self-signed challenge certificate of the name asked
// for, and closes. No challenge connection reaches the mTLS server or the app.
// Before the sidecar has any certificate (the first order), the inbound port has no TLS listener
// yet: `listenBootstrap` holds it meanwhile, answering challenges and closing everything else.
import http from "node:http";
import type { AddressInfo, Socket } from "node:net";
import tls from "node:tls";
import type { Config, ListenAddress } from "../config/schema.js";
import { Acceptor } from "./acceptor.js";
import { ACME_TLS_ALPN, parseClientHello } from "./client-hello.js";
import type { Logger } from "./log.js";

export type ChallengeType = "tls-alpn-01" | "http-01";

/** A change of the pending challenges, as the primary of workers sends it to them (cluster.ts). */
export type ChallengeChange =
  | { op: "addTlsAlpn"; name: string; certPem: string; keyPem: string }
  | { op: "removeTlsAlpn"; name: string }
  | { op: "addHttp"; token: string; keyAuthorization: string }
  | { op: "removeHttp"; token: string };
export type ChallengeResult = "answered" | "unknown";

const HTTP01_PREFIX = "/.well-known/acme-challenge/";

export class ChallengeResponder {
  /** Challenges answered or refused, by type: mtls_acme_challenges_total. */
  readonly counts = new Map<`${ChallengeType}|${ChallengeResult}`, number>();
  private readonly alpn = new Map<string, tls.SecureContext>();
  private readonly tokens = new Map<string, string>();
  private readonly tlsServer: tls.Server;
  private httpServer: http.Server | null = null;
  private bootstrap: Acceptor | null = null;
  /** Called on every change (the primary of workers forwards it; workers answer the CA's connections). */
  onChange: ((change: ChallengeChange) => void) | null = null;

  constructor(
    private readonly logger: Logger,
    private readonly limits: Config["limits"],
  ) {
    this.tlsServer = tls.createServer({
      ALPNProtocols: [ACME_TLS_ALPN],
      minVersion: "TLSv1.2",
      handshakeTimeout: limits.handshakeTimeoutMs,
      SNICallback: (name, done) => {
        const context = this.alpn.get(name.toLowerCase());
        if (context) return done(null, context);
        this.count("tls-alpn-01", "unknown", name, "no challenge is pending for this name");
        done(new Error(`no tls-alpn-01 challenge pending for ${name}`));
      },
    });
    this.tlsServer.on("secureConnection", (socket: tls.TLSSocket) => {
      socket.on("error", () => socket.destroy());
      this.count("tls-alpn-01", "answered", (socket as { servername?: string }).servername ?? "", undefined, socket);
      // The CA has read the certificate; there is nothing else to say on this connection.
      socket.end();
    });
    // A CA that gave up, or a client without SNI (the default context has no certificate).
    this.tlsServer.on("tlsClientError", (err, socket) => {
      this.logger.debug({
        event: "acme_challenge_failed",
        type: "tls-alpn-01",
        reason: err.message,
        remote_addr: socket.remoteAddress,
      });
      socket.destroy();
    });
  }

  private count(type: ChallengeType, result: ChallengeResult, name: string, reason?: string, socket?: Socket): void {
    const key = `${type}|${result}` as const;
    this.counts.set(key, (this.counts.get(key) ?? 0) + 1);
    const line = { type, name, remote_addr: socket?.remoteAddress };
    if (result === "answered") this.logger.info({ event: "acme_challenge_answered", ...line });
    else this.logger.warn({ event: "acme_challenge_unknown", ...line, reason });
  }

  /** Presents `certPem` (the acmeIdentifier certificate) to a tls-alpn-01 validation of `name`. */
  addTlsAlpn(name: string, certPem: string | Buffer, keyPem: string | Buffer): void {
    this.alpn.set(name.toLowerCase(), tls.createSecureContext({ cert: certPem, key: keyPem }));
    this.onChange?.({ op: "addTlsAlpn", name, certPem: certPem.toString(), keyPem: keyPem.toString() });
  }

  removeTlsAlpn(name: string): void {
    this.alpn.delete(name.toLowerCase());
    this.onChange?.({ op: "removeTlsAlpn", name });
  }

  addHttp(token: string, keyAuthorization: string): void {
    this.tokens.set(token, keyAuthorization);
    this.onChange?.({ op: "addHttp", token, keyAuthorization });
  }

  removeHttp(token: string): void {
    this.tokens.delete(token);
    this.onChange?.({ op: "removeHttp", token });
  }

  /** Takes a change made elsewhere (in the primary of workers). */
  apply(change: ChallengeChange): void {
    if (change.op === "addTlsAlpn") this.addTlsAlpn(change.name, change.certPem, change.keyPem);
    else if (change.op === "removeTlsAlpn") this.removeTlsAlpn(change.name);
    else if (change.op === "addHttp") this.addHttp(change.token, change.keyAuthorization);
    else this.removeHttp(change.token);
  }

  /** True when the first TLS record of a connection asks for a tls-alpn-01 validation. */
  static wants(hello: Buffer): boolean {
    return parseClientHello(hello).alpn.includes(ACME_TLS_ALPN);
  }

  /** Takes a raw connection whose ClientHello offered acme-tls/1 (its bytes put back on the socket). */
  handle(raw: Socket): void {
    this.tlsServer.emit("connection", raw);
  }

  /** The http-01 listener: GET /.well-known/acme-challenge/<token> answers the key authorization, all else 404. */
  async listenHttp01(address: ListenAddress): Promise<AddressInfo> {
    const timeout = this.limits.headersTimeoutMs;
    const server = http.createServer({ headersTimeout: timeout, requestTimeout: timeout }, (req, res) => {
      const path = (req.url ?? "").split("?")[0] ?? "";
      const token = path.startsWith(HTTP01_PREFIX) ? path.slice(HTTP01_PREFIX.length) : "";
      const answer = req.method === "GET" || req.method === "HEAD" ? this.tokens.get(token) : undefined;
      if (answer === undefined) {
        if (token)
          this.count(
            "http-01",
            "unknown",
            req.headers.host ?? "",
            "no challenge is pending for this token",
            req.socket,
          );
        res.writeHead(404, { "content-type": "text/plain", connection: "close" });
        res.end("not found\n");
        return;
      }
      this.count("http-01", "answered", req.headers.host ?? "", undefined, req.socket);
      res.writeHead(200, { "content-type": "application/octet-stream", "content-length": Buffer.byteLength(answer) });
      res.end(answer);
    });
    this.httpServer = server;
    await new Promise<void>((resolve, reject) => {
      server.once("error", reject);
      server.listen(address.port, address.host, () => {
        server.off("error", reject);
        resolve();
      });
    });
    server.on("error", (err) => this.logger.error({ event: "listener_error", listener: "acme-http-01", err }));
    this.logger.info({ event: "listening", listener: "acme-http-01", address: `${address.host}:${address.port}` });
    return server.address() as AddressInfo;
  }

  /**
   * Holds the inbound port before the sidecar has a certificate: tls-alpn-01 validations are
   * answered, every other connection is closed at once (there is no identity to speak mTLS with).
   */
  async listenBootstrap(address: ListenAddress): Promise<AddressInfo> {
    const acceptor = new Acceptor(
      this.limits,
      {
        handOver: (raw, hello) => {
          acceptor.settled(raw);
          if (ChallengeResponder.wants(hello)) this.handle(raw);
          else raw.destroy();
        },
        failed: () => {},
        notTls: (raw) => raw.destroy(),
      },
      { readHello: true },
    );
    this.bootstrap = acceptor;
    try {
      return await acceptor.listen(address);
    } catch (err) {
      const code = (err as NodeJS.ErrnoException).code;
      throw new Error(
        `cannot listen on ${address.host}:${address.port} (inbound.listen) to answer the first tls-alpn-01 challenge: ${code}; another process holds the port (with socket activation it is systemd's: start the service once without its socket unit), or use acme.challenge http-01 with acme.http01Listen`,
      );
    }
  }

  async closeBootstrap(): Promise<void> {
    const acceptor = this.bootstrap;
    this.bootstrap = null;
    await acceptor?.close();
  }

  async close(): Promise<void> {
    await this.closeBootstrap();
    const server = this.httpServer;
    this.httpServer = null;
    if (server) {
      server.closeAllConnections();
      await new Promise<void>((resolve) => server.close(() => resolve()));
    }
  }
}

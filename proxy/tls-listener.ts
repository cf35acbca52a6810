// A listener that terminates mutual TLS for the mesh: admission (acceptor.ts), the TLS server,
// the one classification of every handshake (tls.ts), its log line and metrics, and the set of
// open connections that a new CRL or CA bundle is checked against. The HTTP inbound and the TCP
// inbound listeners are built on it and only decide what a verified connection may do.
import { randomBytes } from "node:crypto";
import type { AddressInfo, Socket } from "node:net";
import tls, { type TLSSocket } from "node:tls";
import type { Config } from "../config/schema.js";
import { Acceptor } from "./acceptor.js";
import { ChallengeResponder } from "./acme-challenge.js";
import { type Identity, isRevoked } from "./identity.js";
import type { IdentityChange } from "./identity-store.js";
import type { Logger } from "./log.js";
import type { ConnectionProtocol, Metrics } from "./metrics.js";
import { classifyInbound, failureReason, type PeerTls, serverTlsOptions } from "./tls.js";
import { chainToCa, sha256Of } from "./x509.js";

/** A connection whose handshake passed: verified, or (verifyClient: false) without a certificate. */
export type Accepted = Extract<PeerTls, { kind: "verified" | "unauthenticated" }>;

export interface TlsListenerOptions {
  /** "inbound", or the name of a tcp.inbound listener: for log lines. */
  name: string;
  config: Config;
  identity: Identity;
  metrics: Metrics;
  logger: Logger;
  verifyClient: boolean;
  /** What a connection carries, for mtls_open_connections: by its ALPN, or always tcp. */
  protocol(socket: TLSSocket): ConnectionProtocol;
  /** ALPN protocols offered, in order of preference (none: no ALPN). */
  alpn?: string[];
  /** Closes a connection whose peer is no longer trusted (default: destroy the socket). */
  close?(socket: TLSSocket): void;
  /** With ACME's tls-alpn-01: connections offering ALPN acme-tls/1 go there instead of the mTLS server. */
  acme?: ChallengeResponder | null;
  /** A connection that passed the handshake; the listener has registered it and will close it on revocation. */
  onConnection(socket: TLSSocket, state: Accepted): void;
}

export class TlsListener {
  private readonly acceptor: Acceptor;
  private readonly tlsServer: tls.Server;
  private readonly connections = new Map<TLSSocket, Accepted>();
  private identity: Identity;
  /** When trust (CA bundle or CRL) last changed, and the identity before: see untrusted(). */
  private trustChangedAt = Number.NEGATIVE_INFINITY;
  private previousTrust: Identity;

  constructor(private readonly options: TlsListenerOptions) {
    const { config, metrics, logger, name } = options;
    this.identity = options.identity;
    this.previousTrust = options.identity;
    this.tlsServer = tls.createServer({
      ...serverTlsOptions(this.identity, config.tls),
      // Every client is asked for a certificate; the decision is classifyInbound's, so that a
      // refusal is counted and logged with its real reason.
      requestCert: true,
      rejectUnauthorized: false,
      // The acceptor's deadline covers the whole handshake, from TCP accept (Node's would start later).
      ticketKeys: randomBytes(48),
      ...(options.alpn ? { ALPNProtocols: options.alpn } : {}),
    } as tls.TlsOptions);
    this.tlsServer.on("secureConnection", (socket: TLSSocket) => this.onSecureConnection(socket));
    this.tlsServer.on("tlsClientError", (err: NodeJS.ErrnoException, socket: TLSSocket) =>
      this.onTlsError(err, socket),
    );
    const acme = options.acme ?? null;
    this.acceptor = new Acceptor(
      config.limits,
      {
        handOver: (raw, hello) => {
          if (acme && ChallengeResponder.wants(hello)) {
            this.acceptor.settled(raw); // not an mTLS handshake: neither counted nor timed as one
            acme.handle(raw);
          } else this.tlsServer.emit("connection", raw);
        },
        failed: (reason, source, detail) => {
          metrics.handshakeFailed("inbound", reason);
          logger.warn({
            event: "mtls_handshake_failed",
            direction: "inbound",
            listener: name,
            reason,
            detail,
            remote_addr: source,
          });
        },
        // Closed without an answer: nothing but TLS is ever spoken on this port; the log says why.
        notTls: (raw, http) => {
          metrics.handshakeFailed("inbound", "not_tls");
          logger.warn({
            event: "mtls_handshake_failed",
            direction: "inbound",
            listener: name,
            reason: "not_tls",
            detail: http
              ? "a plain HTTP request on the mTLS port: connect with https and a client certificate"
              : "the first bytes are not a TLS record",
            remote_addr: raw.remoteAddress ?? "unknown",
          });
          raw.destroy();
        },
      },
      // Only with ACME does the listener need the whole ClientHello before the TLS server does.
      { readHello: acme !== null },
    );
    this.acceptor.server.on("error", (err) => logger.error({ event: "listener_error", listener: name, err }));
  }

  get openConnections(): number {
    return this.connections.size;
  }

  get pendingHandshakes(): number {
    return this.acceptor.pendingHandshakes;
  }

  /** Listens on `address`, or on `fd` when systemd handed over the socket. */
  listen(address: { host: string; port: number }, fd?: number): Promise<AddressInfo> {
    return this.acceptor.listen(fd === undefined ? address : { fd });
  }

  address(): AddressInfo | null {
    return this.acceptor.server.address() as AddressInfo | null;
  }

  private onSecureConnection(socket: TLSSocket): void {
    const { metrics, logger, name } = this.options;
    const seconds = this.acceptor.settled(socket);
    const state = classifyInbound(socket, this.options.verifyClient, this.identity.ca.certs);
    const remote = socket.remoteAddress ?? "unknown";
    if (state.kind === "refused") {
      metrics.handshakeFailed("inbound", state.reason);
      logger.warn({
        event: "mtls_handshake_failed",
        direction: "inbound",
        listener: name,
        reason: state.reason,
        detail: state.detail,
        client_cn: state.subject,
        remote_addr: remote,
      });
      socket.destroy();
      return;
    }
    // A handshake that began before a CRL or CA change finished with the context of then: check it
    // against the identity of now, so that it cannot slip past the closing of untrusted peers.
    const untrusted = state.kind === "verified" ? this.untrusted(state) : null;
    if (untrusted) {
      metrics.handshakeFailed("inbound", untrusted === "revoked" ? "revoked" : "unknown_ca");
      logger.warn({
        event: "mtls_handshake_failed",
        direction: "inbound",
        listener: name,
        reason: untrusted === "revoked" ? "revoked" : "unknown_ca",
        detail: "the handshake began before the CRL or CA bundle changed; it no longer verifies",
        client_cn: state.kind === "verified" ? state.peer.commonName : null,
        remote_addr: remote,
      });
      socket.destroy();
      return;
    }
    metrics.handshakeOk("inbound", seconds ?? 0);
    this.connections.set(socket, state);
    metrics.trackConnection("inbound", this.options.protocol(socket), socket);
    socket.once("close", () => this.connections.delete(socket));
    const ours = this.identity.server.peer;
    logger.info({
      event: "mtls_handshake_complete",
      client_cn: state.kind === "verified" ? (state.peer.commonName ?? state.peer.primary) : null,
      server_cn: ours.commonName ?? ours.primary,
      tls_version: state.version,
      cipher_suite: state.cipher,
      direction: "inbound",
      remote_addr: remote,
      resumed: state.resumed,
      alpn: socket.alpnProtocol || null,
      ...(name !== "inbound" ? { listener: name } : {}),
      ...(state.kind === "unauthenticated" ? { unauthenticated: true } : {}),
    });
    this.options.onConnection(socket, state);
  }

  /** The acceptor counts and logs the failure once the connection closes (acceptor.ts). */
  private onTlsError(err: NodeJS.ErrnoException, socket: Socket): void {
    // A reset is a client that gave up mid-handshake (or a ClientHello flood): the acceptor's default.
    if (err.code === "ECONNRESET") return;
    this.acceptor.failedHandshake(socket, failureReason(err.code), err.code ?? err.message);
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
      this.options.config.tls,
    );
    // setSecureContext makes fresh ticket keys; keep the old ones unless trust changed, so a
    // plain certificate rotation does not force every client into a full handshake.
    options.ticketKeys = change.trustChanged ? randomBytes(48) : this.tlsServer.getTicketKeys();
    this.tlsServer.setSecureContext(options);
    if (change.trustChanged) {
      this.trustChangedAt = performance.now();
      this.previousTrust = change.previous;
      this.closeUntrusted(change.previous);
    }
  }

  /**
   * Why a verified peer is no longer trusted under the identity in use, or null: revoked by its
   * CRL, or its CA (the one it chained to directly) gone from the bundle. Peers behind
   * intermediates keep their connection.
   */
  private untrusted(
    state: Extract<Accepted, { kind: "verified" }>,
    previous?: Identity,
  ): "revoked" | "ca_no_longer_trusted" | null {
    if (isRevoked(this.identity, state.peer.serial)) return "revoked";
    // Only a handshake that could have begun before the last trust change needs the chain check.
    if (!previous && performance.now() - this.trustChangedAt > this.options.config.limits.handshakeTimeoutMs)
      return null;
    const trusted = new Set(this.identity.ca.summaries.map((s) => s.sha256));
    const anchor = state.cert && chainToCa(state.cert, [], (previous ?? this.previousTrust).ca.certs);
    return anchor && !trusted.has(sha256Of(anchor)) ? "ca_no_longer_trusted" : null;
  }

  private closeUntrusted(previous: Identity): void {
    for (const [socket, state] of this.connections) {
      if (state.kind !== "verified") continue;
      const { peer } = state;
      const reason = this.untrusted(state, previous);
      if (!reason) continue;
      if (reason === "revoked") this.options.metrics.revokedConnections.inc({ direction: "inbound" });
      this.options.logger.warn({
        event: reason === "revoked" ? "mtls_connection_revoked" : "mtls_connection_untrusted",
        direction: "inbound",
        ...(this.options.name !== "inbound" ? { listener: this.options.name } : {}),
        identity: peer.primary,
        serial: peer.serial,
        remote_addr: socket.remoteAddress,
      });
      if (this.options.close) this.options.close(socket);
      else socket.destroy();
    }
  }

  /**
   * Stops accepting; connections already accepted (in their handshake too: a restart under load
   * must not refuse them) go on. Resolves once every connection has closed.
   */
  stopAccepting(): Promise<void> {
    return this.acceptor.close();
  }

  /** Ends every open connection now. */
  destroyAll(): void {
    for (const socket of this.connections.keys()) socket.destroy();
  }
}

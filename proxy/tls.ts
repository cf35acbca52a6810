// What inbound and outbound share about TLS: the options built from an identity, and the one
// classification of a connection's TLS state. Nothing else in the proxy reads
// `socket.authorized`: it reads the PeerTls value made here, once per connection.
import type { X509Certificate } from "node:crypto";
import tls, { type TLSSocket } from "node:tls";
import type { Config } from "../config/schema.js";
import { chainToCa, type Identity, IdentityError, type IdentityField, pemBlocks } from "./identity.js";
import type { FailureReason } from "./metrics.js";
import { type PeerIdentity, peerIdentity } from "./policy.js";

export type PeerTls =
  | { kind: "verified"; peer: PeerIdentity; cert: X509Certificate; version: string; cipher: string; resumed: boolean }
  | { kind: "unauthenticated"; version: string; cipher: string; resumed: boolean }
  | { kind: "refused"; reason: FailureReason; detail: string; subject: string | null };

/** OpenSSL verify results (socket.authorizationError) and TLS error codes → the reason label. */
const VERIFY_REASONS: Record<string, FailureReason> = {
  CERT_HAS_EXPIRED: "expired",
  CERT_NOT_YET_VALID: "not_yet_valid",
  CERT_REVOKED: "revoked",
  CRL_HAS_EXPIRED: "crl_expired",
  CRL_NOT_YET_VALID: "crl_expired",
  UNABLE_TO_GET_CRL: "crl_missing",
  UNABLE_TO_GET_ISSUER_CERT: "unknown_ca",
  UNABLE_TO_GET_ISSUER_CERT_LOCALLY: "unknown_ca",
  UNABLE_TO_VERIFY_LEAF_SIGNATURE: "unknown_ca",
  SELF_SIGNED_CERT_IN_CHAIN: "unknown_ca",
  DEPTH_ZERO_SELF_SIGNED_CERT: "unknown_ca",
  CERT_CHAIN_TOO_LONG: "unknown_ca",
  CERT_SIGNATURE_FAILURE: "bad_signature",
  CERT_UNTRUSTED: "unknown_ca",
  INVALID_PURPOSE: "bad_san",
  ERR_TLS_CERT_ALTNAME_INVALID: "bad_san",
  ASHMESH_PEER_IDENTITY: "bad_san",
  ASHMESH_PEER_PIN: "bad_pin",
  ASHMESH_PEER_UNKNOWN_CA: "unknown_ca",
  ASHMESH_PEER_NO_CERT: "protocol",
  ERR_TLS_HANDSHAKE_TIMEOUT: "timeout",
  UND_ERR_CONNECT_TIMEOUT: "timeout",
};

export function failureReason(code: string | undefined | null): FailureReason {
  if (!code) return "other";
  const known = VERIFY_REASONS[code];
  if (known) return known;
  if (code.startsWith("ERR_SSL_") || code.startsWith("ERR_TLS_") || code === "EPROTO") return "protocol";
  return "other";
}

/** True for errors raised by TLS itself (as opposed to TCP or DNS): those count as failed handshakes. */
export function isTlsFailure(code: string | undefined): boolean {
  if (!code) return false;
  return code in VERIFY_REASONS || code.startsWith("ERR_SSL_") || code.startsWith("ERR_TLS_") || code === "EPROTO";
}

/**
 * The reason for a verify error, refined: with CRL checks on, OpenSSL reports a certificate from
 * a foreign CA as UNABLE_TO_GET_CRL (it looks for that issuer's CRL first). Every CA we trust has
 * a CRL (identity.ts insists), so a leaf that chains to none of them is an unknown CA.
 */
export function refusalReason(
  code: string,
  cert: X509Certificate | undefined,
  trust: readonly X509Certificate[],
): FailureReason {
  const reason = failureReason(code);
  if (reason === "crl_missing" && cert && !chainToCa(cert, [], trust)) return "unknown_ca";
  return reason;
}

/**
 * The TLS state of an inbound connection once its handshake is done. The server runs with
 * rejectUnauthorized: false so that the reason is known (with `true`, OpenSSL aborts and Node
 * reports a bare reset); this function is where the refusal is decided instead.
 */
export function classifyInbound(socket: TLSSocket, verifyClient: boolean, trust: readonly X509Certificate[]): PeerTls {
  const version = socket.getProtocol() ?? "unknown";
  const cipher = socket.getCipher()?.standardName ?? "unknown";
  const resumed = socket.isSessionReused();
  const cert: X509Certificate | undefined = socket.getPeerX509Certificate();
  if (!cert) {
    // An empty peer certificate is never an identity (nodejs/node#35317).
    if (!verifyClient) return { kind: "unauthenticated", version, cipher, resumed };
    return { kind: "refused", reason: "no_client_cert", detail: "the client sent no certificate", subject: null };
  }
  const subject =
    cert.subject
      .split("\n")
      .find((l) => l.startsWith("CN="))
      ?.slice(3) ?? null;
  if (!socket.authorized) {
    const code = String(socket.authorizationError ?? "UNKNOWN");
    return { kind: "refused", reason: refusalReason(code, cert, trust), detail: code, subject };
  }
  return { kind: "verified", peer: cachedPeerIdentity(cert), cert, version, cipher, resumed };
}

const peerCache = new Map<string, PeerIdentity>();

/** Identities by certificate fingerprint: connections from one peer share one value. */
export function cachedPeerIdentity(cert: X509Certificate): PeerIdentity {
  const key = cert.fingerprint256;
  let peer = peerCache.get(key);
  if (!peer) {
    if (peerCache.size >= 4096) peerCache.clear();
    peer = peerIdentity(cert);
    peerCache.set(key, peer);
  }
  return peer;
}

/**
 * The CRLs as separate PEM strings: Node reads only the first CRL of a Buffer, and a CA roll
 * needs one CRL per trusted CA.
 */
function crlOption(identity: Identity): { crl?: string[] } {
  return identity.crl ? { crl: pemBlocks(identity.crl.pem.toString("latin1"), "X509 CRL") } : {};
}

/** Options for the inbound server's secure context (also used by setSecureContext on reload). */
export function serverTlsOptions(identity: Identity, config: Config["tls"]): tls.SecureContextOptions {
  return {
    cert: identity.server.certPem,
    key: identity.server.keyPem,
    ca: identity.ca.pem,
    ...crlOption(identity),
    minVersion: config.minVersion,
    ciphers: config.ciphers.join(":"),
    honorCipherOrder: true,
  };
}

/**
 * Throws an IdentityError naming the file when OpenSSL would refuse a part of `identity` in the
 * contexts the listeners build (a key too small for the security level, a weak signature, a CRL
 * it cannot parse): validation in identity.ts checks what a mesh needs, this checks what OpenSSL
 * takes. Parts first, so that the error names the right file; then the contexts as built.
 */
export function assertUsable(identity: Identity, config: Config["tls"]): void {
  const base = { minVersion: config.minVersion, ciphers: config.ciphers.join(":") };
  const parts: Array<[IdentityField, string, tls.SecureContextOptions]> = [
    ["tls.cert", config.cert, { cert: identity.server.certPem, key: identity.server.keyPem }],
    [
      "tls.clientCert",
      config.clientCert ?? config.cert,
      { cert: identity.client.certPem, key: identity.client.keyPem },
    ],
    ["tls.ca", config.ca, { ca: identity.ca.pem }],
    ["tls.crl", config.crl ?? config.ca, { ca: identity.ca.pem, ...crlOption(identity) }],
  ];
  for (const [field, file, options] of parts) {
    try {
      tls.createSecureContext({ ...base, ...options });
    } catch (err) {
      throw new IdentityError(field, file, `OpenSSL refuses it: ${(err as Error).message}`);
    }
  }
  try {
    tls.createSecureContext(serverTlsOptions(identity, config));
    clientSecureContext(identity, config);
  } catch (err) {
    throw new IdentityError(
      "tls.cert",
      config.cert,
      `OpenSSL refuses the identity as a whole: ${(err as Error).message}`,
    );
  }
}

/** One client context per identity, shared by every outbound connection (building one costs ~1 ms). */
export function clientSecureContext(identity: Identity, config: Config["tls"]): tls.SecureContext {
  return tls.createSecureContext({
    cert: identity.client.certPem,
    key: identity.client.keyPem,
    ca: identity.ca.pem,
    ...crlOption(identity),
    minVersion: config.minVersion,
    ciphers: config.ciphers.join(":"),
  });
}

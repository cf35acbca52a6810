// What inbound and outbound share about TLS: the options built from an identity, and the one
// classification of a connection's TLS state. Nothing else in the proxy reads
// `socket.authorized`: it reads the PeerTls value made here, once per connection.
import type { X509Certificate } from "node:crypto";
import tls, { type TLSSocket } from "node:tls";
import type { Config } from "../config/schema.js";
import { type Identity, IdentityError, type IdentityField } from "./identity.js";
import type { FailureReason } from "./metrics.js";
import { type PeerIdentity, peerIdentity } from "./policy.js";
import { chainToCa, commonName, pemBlocks, spkiPin, subjectOf, weakKey } from "./x509.js";

/** What every completed handshake negotiated. */
export interface Negotiated {
  version: string;
  cipher: string;
  resumed: boolean;
}

/** A connection's TLS state, decided once when its handshake completes. */
export type PeerTls =
  // `cert` is null for a resumed outbound session, whose certificate is not sent again.
  | ({ kind: "verified"; peer: PeerIdentity; cert: X509Certificate | null } & Negotiated)
  | ({ kind: "unauthenticated" } & Negotiated)
  | { kind: "refused"; reason: FailureReason; detail: string; subject: string | null };

export type Verified = Extract<PeerTls, { kind: "verified" }>;
export type Refused = Extract<PeerTls, { kind: "refused" }>;

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
  INVALID_PURPOSE: "bad_certificate",
  ERR_TLS_CERT_ALTNAME_INVALID: "bad_san",
  ERR_TLS_HANDSHAKE_TIMEOUT: "timeout",
  UND_ERR_CONNECT_TIMEOUT: "timeout",
};

/** The reason label for an OpenSSL verify result or a TLS error code. */
export function failureReason(code: string | undefined | null): FailureReason {
  if (!code) return "other";
  const known = VERIFY_REASONS[code];
  if (known) return known;
  if (code.startsWith("ERR_SSL_") || code.startsWith("ERR_TLS_") || code === "EPROTO") return "protocol";
  return "other";
}

/** True for errors raised by TLS itself (as opposed to TCP or DNS): those count as failed handshakes. */
export function isTlsFailure(err: unknown): boolean {
  if (err instanceof PeerRefusedError) return true;
  const code = (err as { code?: string } | null)?.code;
  if (!code) return false;
  return code in VERIFY_REASONS || code.startsWith("ERR_SSL_") || code.startsWith("ERR_TLS_") || code === "EPROTO";
}

/**
 * The reason for a verify error, refined: with CRL checks on, OpenSSL reports a certificate from
 * a foreign CA as UNABLE_TO_GET_CRL (it looks for that issuer's CRL first). Every CA we trust has
 * a CRL (identity.ts insists), so a leaf that chains to none of them is an unknown CA.
 */
function refusalReason(
  code: string,
  cert: X509Certificate | undefined,
  trust: readonly X509Certificate[],
): FailureReason {
  const reason = failureReason(code);
  if (reason === "crl_missing" && cert && !chainToCa(cert, [], trust)) return "unknown_ca";
  return reason;
}

function negotiated(socket: TLSSocket): Negotiated {
  return {
    version: socket.getProtocol() ?? "unknown",
    cipher: socket.getCipher()?.standardName ?? "unknown",
    resumed: socket.isSessionReused(),
  };
}

/** The chain verdict OpenSSL reached (CA bundle, CRL, dates), as a refusal, or null when it verified. */
function chainRefusal(socket: TLSSocket, cert: X509Certificate, trust: readonly X509Certificate[]): Refused | null {
  if (socket.authorized) return null;
  const code = String(socket.authorizationError ?? "UNKNOWN");
  // OpenSSL refuses a key below its security level, and Node reports that as UNSPECIFIED: say why.
  const problem = code === "UNSPECIFIED" ? inspectPeer(cert).problem : null;
  if (problem) return { kind: "refused", reason: "bad_certificate", detail: problem, subject: commonName(cert) };
  return { kind: "refused", reason: refusalReason(code, cert, trust), detail: code, subject: commonName(cert) };
}

/**
 * The TLS state of an inbound connection once its handshake is done. The server runs with
 * rejectUnauthorized: false so that the reason is known (with `true`, OpenSSL aborts and Node
 * reports a bare reset); this function is where the refusal is decided instead.
 */
export function classifyInbound(socket: TLSSocket, verifyClient: boolean, trust: readonly X509Certificate[]): PeerTls {
  const cert: X509Certificate | undefined = socket.getPeerX509Certificate();
  if (!cert) {
    // An empty peer certificate is never an identity (nodejs/node#35317).
    if (!verifyClient) return { kind: "unauthenticated", ...negotiated(socket) };
    return { kind: "refused", reason: "no_client_cert", detail: "the client sent no certificate", subject: null };
  }
  const refused = chainRefusal(socket, cert, trust);
  if (refused) return refused;
  const { peer, problem } = inspectPeer(cert);
  if (problem) return { kind: "refused", reason: "bad_certificate", detail: problem, subject: commonName(cert) };
  return { kind: "verified", peer, cert, ...negotiated(socket) };
}

/** What outbound expects of a server: the identity its certificate must carry, and an optional SPKI pin. */
export interface Expected {
  /** A DNS or URI SAN the certificate must carry, exactly (never through a wildcard). */
  identity: string;
  /** "sha256//<base64 SPKI>" or null. */
  pin: string | null;
  /** For messages: "auth.ashchan.local:8443". */
  label: string;
}

/**
 * The TLS state of an outbound connection after a full handshake: the chain verified (CA bundle
 * and CRL), an exact DNS or URI SAN equal to the expected identity, and the pin when one is set.
 */
export function classifyOutbound(
  socket: TLSSocket,
  expected: Expected,
  trust: readonly X509Certificate[],
): Verified | Refused {
  const cert: X509Certificate | undefined = socket.getPeerX509Certificate();
  if (!cert) {
    return { kind: "refused", reason: "protocol", detail: `${expected.label} presented no certificate`, subject: null };
  }
  const chain = chainRefusal(socket, cert, trust);
  if (chain) {
    return {
      ...chain,
      detail: `${expected.label}: the server certificate did not verify: ${chain.reason} (${chain.detail})`,
    };
  }
  const { peer, problem } = inspectPeer(cert);
  if (problem) {
    return {
      kind: "refused",
      reason: "bad_certificate",
      detail: `${expected.label}: the server certificate is refused: ${problem}`,
      subject: commonName(cert),
    };
  }
  const carries = expected.identity.includes("://")
    ? peer.uris.includes(expected.identity)
    : peer.dns.includes(expected.identity.toLowerCase());
  if (!carries) {
    const presented = [...peer.dns, ...peer.uris].join(", ") || subjectOf(cert);
    return {
      kind: "refused",
      reason: "bad_san",
      detail: `${expected.label} presented a certificate for ${presented}, not for ${expected.identity}`,
      subject: commonName(cert),
    };
  }
  if (expected.pin) {
    const pin = spkiPin(cert.publicKey);
    if (pin.slice("sha256//".length) !== expected.pin.replace(/^sha256\/\/?/, "")) {
      return {
        kind: "refused",
        reason: "bad_pin",
        detail: `${expected.label} presented a key whose SPKI pin ${pin} is not the configured pin`,
        subject: commonName(cert),
      };
    }
  }
  return { kind: "verified", peer, cert, ...negotiated(socket) };
}

/**
 * A resumed outbound session: its certificate is not sent again (and Node may show none), so the
 * identity is the one verified when the session was first made; OpenSSL's verdict still counts.
 */
export function classifyResumed(socket: TLSSocket, peer: PeerIdentity, expected: Expected): Verified | Refused {
  if (!socket.authorized) {
    const code = String(socket.authorizationError ?? "UNKNOWN");
    return {
      kind: "refused",
      reason: failureReason(code),
      detail: `${expected.label}: resumed session not authorized (${code})`,
      subject: peer.commonName,
    };
  }
  return { kind: "verified", peer, cert: null, ...negotiated(socket) };
}

/** A server outbound refused, as the error its connection attempt fails with (errors.ts maps `reason`). */
export class PeerRefusedError extends Error {
  readonly code = "ASHMESH_PEER_REFUSED";
  constructor(readonly refusal: Refused) {
    super(refusal.detail);
    this.name = "PeerRefusedError";
  }
}

/** A verified certificate, read once: who it names, and why it may not be a peer's leaf (or null). */
interface PeerCertificate {
  peer: PeerIdentity;
  problem: string | null;
}

const peerCache = new Map<string, PeerCertificate>();

/**
 * Reads a chain-verified peer certificate once per fingerprint (connections from one peer share
 * the value). OpenSSL accepts a CA certificate as a client's leaf, and any key size its security
 * level allows (RSA 1024 at level 1); ashmesh takes from peers only what it would take for itself.
 */
function inspectPeer(cert: X509Certificate): PeerCertificate {
  const key = cert.fingerprint256;
  let entry = peerCache.get(key);
  if (!entry) {
    if (peerCache.size >= 4096) peerCache.clear();
    const weak = weakKey(cert.publicKey);
    entry = {
      peer: peerIdentity(cert),
      problem: cert.ca
        ? "the certificate is a CA certificate (basicConstraints CA:TRUE), not a leaf"
        : weak
          ? `its key is too weak: ${weak}`
          : null,
    };
    peerCache.set(key, entry);
  }
  return entry;
}

/**
 * The CRLs as separate PEM strings: Node reads only the first CRL of a Buffer, and a CA roll
 * needs one CRL per trusted CA.
 */
function crlOption(identity: Identity): { crl?: string[] } {
  return identity.crl ? { crl: pemBlocks(identity.crl.pem.toString("latin1"), "X509 CRL").map((b) => b.text) } : {};
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

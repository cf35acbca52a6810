// Who a verified peer is, and whether it may make a request. `authorize` is a pure function of
// the policy, the peer and the request, so every rule is unit-tested with values built in memory.
// Allow-list entries are ORed: a peer is allowed when any of its names matches any entry.
import type { X509Certificate } from "node:crypto";
import { commonName, serialOf, sha256Of, subjectAltNames, subjectOf } from "./x509.js";

/** The identity a verified certificate vouches for. Built once per certificate, then cached. */
export interface PeerIdentity {
  /**
   * Every name that may match an allow-list entry: the DNS and URI SANs, or, for a certificate
   * without any SAN, the subject CN (RFC 6125 §6.4.4: once a certificate has SANs, its CN names nobody).
   */
  names: string[];
  /** The name used in logs, metric labels and XFCC: the first of `names`, else the serial. */
  primary: string;
  commonName: string | null;
  dns: string[];
  uris: string[];
  /** RFC 2253 subject, e.g. "CN=boards.ashchan.local". */
  subject: string;
  serial: string;
  /** Lower-case hex SHA-256 of the DER certificate (XFCC's Hash). */
  sha256: string;
}

export function peerIdentity(cert: X509Certificate): PeerIdentity {
  const { dns, uris, any } = subjectAltNames(cert);
  const cn = commonName(cert);
  const names = any ? [...new Set([...dns, ...uris])] : cn ? [cn.toLowerCase()] : [];
  return {
    names,
    primary: names[0] ?? `serial:${serialOf(cert)}`,
    commonName: cn,
    dns,
    uris,
    subject: subjectOf(cert),
    serial: serialOf(cert),
    sha256: sha256Of(cert),
  };
}

/** Compiled allow-list: exact names, "*.domain" (exactly one more label), or "*" (any verified peer). */
export interface IdentityMatcher {
  any: boolean;
  exact: Set<string>;
  /** ".ashchan.local" for "*.ashchan.local". */
  suffixes: string[];
}

export function compileMatcher(entries: readonly string[]): IdentityMatcher {
  const matcher: IdentityMatcher = { any: false, exact: new Set(), suffixes: [] };
  for (const entry of entries) {
    if (entry === "*") matcher.any = true;
    else if (entry.startsWith("*.")) matcher.suffixes.push(entry.slice(1).toLowerCase());
    // DNS names compare without case; a URI (spiffe://…, any scheme) is kept as written, as its SAN is.
    else matcher.exact.add(entry.includes("://") ? entry : entry.toLowerCase());
  }
  return matcher;
}

export function matchesName(matcher: IdentityMatcher, name: string): boolean {
  if (matcher.any || matcher.exact.has(name)) return true;
  for (const suffix of matcher.suffixes) {
    if (name.length > suffix.length && name.endsWith(suffix)) {
      const label = name.slice(0, name.length - suffix.length);
      if (!label.includes(".") && !label.includes("/") && !label.includes(":")) return true;
    }
  }
  return false;
}

export function matches(matcher: IdentityMatcher, names: readonly string[]): boolean {
  for (const name of names) if (matchesName(matcher, name)) return true;
  return false;
}

export interface Route {
  /** Path prefix on segment boundaries: "/api/v1/verify" matches "/api/v1/verify/x", not "/api/v1/verifyx". */
  path: string;
  methods: ReadonlySet<string> | null;
  allow: IdentityMatcher;
}

export interface Policy {
  /** null: any identity the mesh CA signed. */
  allow: IdentityMatcher | null;
  routes: Route[];
}

export interface PolicyInput {
  allow?: readonly string[] | undefined;
  routes?: ReadonlyArray<{ path: string; methods?: readonly string[] | undefined; allow: readonly string[] }>;
}

export function compilePolicy(input: PolicyInput): Policy {
  return {
    allow: input.allow ? compileMatcher(input.allow) : null,
    routes: (input.routes ?? []).map((r) => ({
      path: r.path.length > 1 ? r.path.replace(/\/+$/, "") : r.path,
      methods: r.methods ? new Set(r.methods) : null,
      allow: compileMatcher(r.allow),
    })),
  };
}

export type Decision =
  | { allowed: true; route: string }
  | { allowed: false; route: string; reason: "not_allowed" | "unauthenticated" | "non_canonical_path" };

function underPrefix(path: string, prefix: string): boolean {
  if (prefix === "/") return true;
  return path === prefix || (path.startsWith(prefix) && path.charCodeAt(prefix.length) === 47) /* / */;
}

/**
 * A path that two parsers could read differently: dot segments, doubled or encoded slashes,
 * backslashes, encoded dots. With path rules in force, such a request is refused rather than
 * guessed at, so "/api/v1/verify" cannot be reached as "/api//v1/./verify" or "/api/v1/%76erify".
 */
export function isCanonicalPath(path: string): boolean {
  if (path.includes("//") || path.includes("\\")) return false;
  if (/%(?:2e|2f|5c)/i.test(path)) return false;
  for (const segment of path.split("/")) if (segment === "." || segment === "..") return false;
  return !/%(?:[46][1-9a-f]|[57][0-9a]|3[0-9]|2d|5f|7e)/i.test(path); // encoded unreserved characters
}

/**
 * The decision for one request. `path` is the request target without its query string;
 * `peer` is null for a client without a certificate (only possible with verifyClient: false).
 */
export function authorize(policy: Policy, peer: PeerIdentity | null, method: string, path: string): Decision {
  let allow = policy.allow;
  let route = "default";
  if (policy.routes.length > 0) {
    if (!isCanonicalPath(path)) return { allowed: false, route, reason: "non_canonical_path" };
    for (const r of policy.routes) {
      if ((r.methods === null || r.methods.has(method)) && underPrefix(path, r.path)) {
        allow = r.allow;
        route = r.path;
        break;
      }
    }
  }
  if (peer === null) {
    // A peer without a certificate only passes where any caller is allowed and no rule applies.
    return policy.allow === null && route === "default"
      ? { allowed: true, route }
      : { allowed: false, route, reason: "unauthenticated" };
  }
  if (allow === null || matches(allow, peer.names)) return { allowed: true, route };
  return { allowed: false, route, reason: "not_allowed" };
}

// `certs issue-all`: a certificate for every service and TCP server of a mesh file, so that a
// new mesh (or a new service in it) needs one command. Idempotent: a current certificate is kept; one that is
// missing, expired, revoked or signed by a CA no longer trusted is issued again.
import { existsSync } from "node:fs";
import type { Mesh } from "../config/mesh.js";
import { DevCa, isCurrent } from "./store.js";

/** Why `name` needs a certificate at `now`, or null when the one it has is good. */
function need(ca: DevCa, name: string, now: Date): string | null {
  const latest = ca.latest(name);
  const files = ca.identityFiles(name);
  if (!latest) return "it has none";
  if (!isCurrent(latest)) return `serial ${latest.serial} is revoked`;
  if (Date.parse(latest.notAfter) <= now.getTime()) return `serial ${latest.serial} expired on ${latest.notAfter}`;
  if (!ca.trustedCas().some((c) => c.serial === latest.caSerial)) return `its CA ${latest.caSerial} is retired`;
  if (!existsSync(files.cert) || !existsSync(files.key)) return `${files.cert} or ${files.key} is missing`;
  return null;
}

export async function issueAll(
  mesh: Mesh,
  dir: string,
  options: { days?: number; now?: Date } = {},
  say: (line: string) => void = () => {},
): Promise<void> {
  const now = options.now ?? new Date();
  let ca: DevCa;
  if (DevCa.exists(dir)) {
    ca = DevCa.open(dir);
  } else {
    ca = await DevCa.init(dir, { commonName: mesh.caName });
    say(`created CA ${ca.active.subject} (serial ${ca.active.serial}) in ${dir}`);
  }
  // Every sidecar needs one: the services' and the TCP servers'.
  for (const s of [...mesh.services, ...mesh.tcp]) {
    const why = need(ca, s.dnsName, now);
    const latest = ca.latest(s.dnsName);
    if (!why && latest) {
      say(`kept   ${s.dnsName}: serial ${latest.serial}, valid until ${latest.notAfter.slice(0, 10)}`);
      continue;
    }
    // Replace only what the index knows: files of unknown origin are never overwritten (issue refuses).
    const record = await ca.issue(s.dnsName, {
      dns: latest?.dns ?? [],
      ip: latest?.ip ?? [],
      uri: latest?.uri ?? [],
      days: options.days ?? 365,
      replace: latest !== undefined,
    });
    say(`issued ${s.dnsName} (${why}): serial ${record.serial}, valid until ${record.notAfter.slice(0, 10)}`);
  }
}

// "Hosts" for the tests: Linux network namespaces joined by veth pairs to a bridge in a namespace
// of their own (the LAN), made with iproute2 and removed in teardown, failure or not. The test
// process reaches the LAN through one more veth pair, so it can play the client and the CA's CRL
// distribution point. Names resolve the way seed 003's hosts do without Podman's DNS: a hosts
// file per namespace, /etc/netns/<ns>/hosts, which `ip netns exec` bind-mounts over /etc/hosts.
// WireGuard would be the production link between hosts; where the kernel has no wireguard module
// (this project's machines: "Unknown device type"), plain veths carry the traffic, which is what
// the sidecars' mTLS has to protect anyway.
import { randomBytes } from "node:crypto";
import { existsSync, mkdirSync, readdirSync, rmdirSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import type { Tap } from "./mesh.js";
import { run, tool } from "./ops.js";

export const ipTool = tool("ip", "iproute2");

const NETNS_ETC = "/etc/netns";

/** Why namespaces cannot be made here (not root, no CAP_NET_ADMIN), or null when they can. */
export async function namespacesUnavailable(): Promise<string | null> {
  if (!ipTool.path) return ipTool.skip || "ip is missing";
  const probe = `amprobe${randomBytes(3).toString("hex")}`;
  const made = await run(ipTool.path, ["netns", "add", probe]);
  if (made.code !== 0) {
    return `cannot create network namespaces (${made.output.trim() || `exit ${made.code}`}): run as root or with CAP_NET_ADMIN and CAP_SYS_ADMIN`;
  }
  await run(ipTool.path, ["netns", "del", probe]);
  return null;
}

export interface Lan {
  /** "10.X.Y": the /24 every address below is in. */
  prefix: string;
  /** The LAN's namespace (bridge, and whatever runs "on the network": the CA). */
  lan: string;
  /** The address of the bridge in the LAN namespace. */
  lanAddress: string;
  /** The test process's own address on the LAN. */
  rootAddress: string;
  /** Host namespaces, in order. */
  hosts: string[];
  /** ["ip", "netns", "exec", ns]. */
  exec(ns: string): string[];
  /** Whether WireGuard was available (it is tried; plain veths otherwise). */
  wireguard: boolean;
}

async function ip(args: string[]): Promise<void> {
  const r = await run(ipTool.path as string, args);
  if (r.code !== 0) throw new Error(`ip ${args.join(" ")}: ${r.output.trim()}`);
}

/** A /24 in 10.200–249.x.0 that no route of this machine covers. */
async function freeSubnet(): Promise<string> {
  const routes = (await run(ipTool.path as string, ["-4", "route", "show", "table", "all"])).output;
  for (let i = 0; i < 50; i++) {
    const prefix = `10.${200 + Math.floor(Math.random() * 50)}.${1 + Math.floor(Math.random() * 250)}`;
    if (!routes.includes(`${prefix}.`)) return prefix;
  }
  throw new Error("no free 10.x.y.0/24 for the test LAN");
}

/**
 * Makes the LAN and `addresses.length` hosts; host i gets the addresses `addresses[i]` (last
 * octets), the first being its primary. `names` (name → last octet) go into every hosts file.
 */
export async function lan(t: Tap, options: { addresses: number[][]; names: Record<string, number> }): Promise<Lan> {
  const id = randomBytes(2).toString("hex");
  const prefix = await freeSubnet();
  const lanNs = `am${id}lan`;
  const hosts = options.addresses.map((_, i) => `am${id}h${i + 1}`);
  const all = [lanNs, ...hosts];
  const rootIf = `am${id}r`;
  const created: string[] = [];
  let madeEtc = false;
  // One teardown, registered before anything exists: whatever was made is removed, in reverse.
  t.teardown(async () => {
    for (const ns of [...created].reverse()) await run(ipTool.path as string, ["netns", "del", ns]);
    await run(ipTool.path as string, ["link", "del", rootIf]); // gone with its peer already, normally
    for (const ns of all) rmSync(join(NETNS_ETC, ns), { recursive: true, force: true });
    if (madeEtc && existsSync(NETNS_ETC) && readdirSync(NETNS_ETC).length === 0) rmdirSync(NETNS_ETC);
  });

  madeEtc = !existsSync(NETNS_ETC);
  const hostsFile = [
    "127.0.0.1 localhost",
    "::1 localhost",
    ...Object.entries(options.names).map(([name, octet]) => `${prefix}.${octet} ${name}`),
    "",
  ].join("\n");
  for (const ns of all) {
    mkdirSync(join(NETNS_ETC, ns), { recursive: true });
    writeFileSync(join(NETNS_ETC, ns, "hosts"), hostsFile);
  }
  for (const ns of all) {
    await ip(["netns", "add", ns]);
    created.push(ns);
    await ip(["-n", ns, "link", "set", "lo", "up"]);
  }
  await ip(["-n", lanNs, "link", "add", "br0", "type", "bridge"]);
  await ip(["-n", lanNs, "addr", "add", `${prefix}.1/24`, "dev", "br0"]);
  await ip(["-n", lanNs, "link", "set", "br0", "up"]);
  for (const [i, ns] of hosts.entries()) {
    const port = `p${i + 1}`;
    await ip(["link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", port, "netns", lanNs]);
    await ip(["-n", lanNs, "link", "set", port, "master", "br0", "up"]);
    for (const octet of options.addresses[i] ?? [])
      await ip(["-n", ns, "addr", "add", `${prefix}.${octet}/24`, "dev", "eth0"]);
    await ip(["-n", ns, "link", "set", "eth0", "up"]);
  }
  await ip(["link", "add", rootIf, "type", "veth", "peer", "name", "proot", "netns", lanNs]);
  await ip(["-n", lanNs, "link", "set", "proot", "master", "br0", "up"]);
  await ip(["addr", "add", `${prefix}.254/24`, "dev", rootIf]);
  await ip(["link", "set", rootIf, "up"]);
  // WireGuard between hosts where the kernel has it; say which.
  const wg = await run(ipTool.path as string, ["-n", lanNs, "link", "add", "wgprobe", "type", "wireguard"]);
  if (wg.code === 0) await run(ipTool.path as string, ["-n", lanNs, "link", "del", "wgprobe"]);
  return {
    prefix,
    lan: lanNs,
    lanAddress: `${prefix}.1`,
    rootAddress: `${prefix}.254`,
    hosts,
    exec: (ns) => [ipTool.path as string, "netns", "exec", ns],
    wireguard: wg.code === 0,
  };
}

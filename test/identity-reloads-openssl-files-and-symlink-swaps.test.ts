// What an outside check does: a PKI made with the openssl CLI (not our CA code), files swapped
// the way Kubernetes and Vault Agent do (`..data` symlink renamed into place), curl sending
// requests all along, a broken file, and a client revoked by an openssl-made CRL — resumption with
// an `openssl s_client -sess_out` session included.
import { spawnSync } from "node:child_process";
import { mkdirSync, mkdtempSync, renameSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import tls from "node:tls";
import t from "tap";
import { parseConfig } from "../config/load.js";
import { Sidecar } from "../proxy/sidecar.js";
import { hasOpenssl, NEW_P256_KEY, opensslOk } from "./lib/certs.js";
import { app, eventually, LogLines, sleep } from "./lib/mesh.js";
import { run } from "./lib/run.js";

const hasTools = hasOpenssl && spawnSync("curl", ["--version"]).status === 0;

const CA_CNF = `[ca]
default_ca = ops
[ops]
dir = .
database = index.txt
unique_subject = no
new_certs_dir = .
certificate = ca.crt
private_key = ca.key
serial = serial
crlnumber = crlnumber
default_md = sha256
default_days = 365
default_crl_days = 7
policy = any
[any]
commonName = supplied
`;

/** A leaf signed by the openssl CA in `dir`: `<name>.crt`, `<name>.key`. */
async function leaf(dir: string, name: string, cn: string): Promise<void> {
  writeFileSync(
    join(dir, `${name}.ext`),
    `subjectAltName=DNS:${cn}\nkeyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=critical,CA:FALSE\n`,
  );
  const cwd = { cwd: dir };
  await opensslOk(["req", ...NEW_P256_KEY, "-keyout", `${name}.key`, "-out", `${name}.csr`, "-subj", `/CN=${cn}`], cwd);
  const ca = ["ca", "-batch", "-config", "ca.cnf"];
  await opensslOk([...ca, "-in", `${name}.csr`, "-out", `${name}.crt`, "-extfile", `${name}.ext`, "-notext"], cwd);
}

t.test(
  "openssl-made files, swapped like Kubernetes secrets, under curl",
  { skip: hasTools ? false : "openssl or curl is not installed" },
  async (t) => {
    const dir = mkdtempSync(join(tmpdir(), "ashmesh-openssl-"));
    t.teardown(() => rmSync(dir, { recursive: true, force: true }));
    const pki = join(dir, "pki");
    mkdirSync(pki);
    writeFileSync(join(pki, "ca.cnf"), CA_CNF);
    writeFileSync(join(pki, "index.txt"), "");
    writeFileSync(join(pki, "serial"), "1000\n");
    writeFileSync(join(pki, "crlnumber"), "1000\n");
    const cwd = { cwd: pki };
    await opensslOk(
      [
        "req",
        "-x509",
        ...NEW_P256_KEY,
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "3650",
        "-subj",
        "/CN=ops-ca",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
      ],
      cwd,
    );
    await leaf(pki, "auth1", "auth.ashchan.local");
    await leaf(pki, "client", "gateway.ashchan.local");
    await opensslOk(["ca", "-config", "ca.cnf", "-gencrl", "-out", "ca.crl"], cwd);

    // The secret volume: ..2026_1/ holds the files, ..data points at it, the names point into ..data.
    const secret = join(dir, "secret");
    mkdirSync(secret);
    let generation = 0;
    const publish = (cert: string, key: string) => {
      generation++;
      const version = join(secret, `..2026_${generation}`);
      mkdirSync(version);
      writeFileSync(join(version, "server.crt"), cert);
      writeFileSync(join(version, "server.key"), key, { mode: 0o600 });
      symlinkSync(`..2026_${generation}`, join(secret, "..data_tmp"));
      renameSync(join(secret, "..data_tmp"), join(secret, "..data")); // the atomic swap
    };
    const read = (f: string) => spawnSync("cat", [join(pki, f)]).stdout.toString();
    publish(read("auth1.crt"), read("auth1.key"));
    symlinkSync("..data/server.crt", join(secret, "server.crt"));
    symlinkSync("..data/server.key", join(secret, "server.key"));
    const trust = join(dir, "trust");
    mkdirSync(trust);
    writeFileSync(join(trust, "ca.crt"), read("ca.crt"));
    writeFileSync(join(trust, "ca.crl"), read("ca.crl"));

    const backend = await app(t);
    const logs = new LogLines();
    const sidecar = await Sidecar.create(
      parseConfig({
        service: { name: "auth-accounts", dnsName: "auth.ashchan.local" },
        tls: {
          cert: join(secret, "server.crt"),
          key: join(secret, "server.key"),
          ca: join(trust, "ca.crt"),
          crl: join(trust, "ca.crl"),
        },
        inbound: { listen: "127.0.0.1:0", app: backend.url },
        outbound: { enabled: false },
        admin: { enabled: false },
      }),
      { logDestination: logs, processMetrics: false },
    );
    t.teardown(() => sidecar.stop());
    const port = (await sidecar.start()).inbound?.port as number;

    const curlArgs = [
      "-sS",
      "-o",
      "/dev/null",
      "-w",
      "%{http_code}",
      "--cacert",
      join(pki, "ca.crt"),
      "--cert",
      join(pki, "client.crt"),
      "--key",
      join(pki, "client.key"),
      "--resolve",
      `auth.ashchan.local:${port}:127.0.0.1`,
      `https://auth.ashchan.local:${port}/`,
    ];
    const presented = () =>
      new Promise<string>((resolve) => {
        const s = tls.connect(
          {
            host: "127.0.0.1",
            port,
            servername: "auth.ashchan.local",
            ca: read("ca.crt"),
            cert: read("client.crt"),
            key: read("client.key"),
          },
          () => {
            resolve(s.getPeerX509Certificate()?.serialNumber ?? "");
            s.end();
          },
        );
        s.on("error", () => resolve("error"));
      });
    const serialOf = async (crt: string) =>
      (await run("openssl", ["x509", "-in", join(pki, crt), "-noout", "-serial"])).out.trim().replace("serial=", "");

    // curl all along; rotations by symlink swap in between.
    let stop = false;
    t.teardown(() => {
      stop = true;
    });
    const codes: string[] = [];
    const curlLoop = (async () => {
      while (!stop) {
        codes.push((await run("curl", curlArgs)).out);
        await sleep(20);
      }
    })();
    const serials = [await serialOf("auth1.crt")];
    t.equal(await presented(), serials[0]);
    for (let i = 2; i <= 4; i++) {
      await leaf(pki, `auth${i}`, "auth.ashchan.local");
      publish(read(`auth${i}.crt`), read(`auth${i}.key`));
      serials.push(await serialOf(`auth${i}.crt`));
      t.ok(
        await eventually(async () => (await presented()) === serials.at(-1), 10_000),
        `new handshakes present serial ${serials.at(-1)} without a restart`,
      );
    }
    // A broken file: ignored, the last good certificate stays.
    publish("-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n", read("auth4.key"));
    t.ok(await eventually(() => logs.events("cert_reload_failed").length > 0, 3_000), "the broken file is reported");
    t.equal(await presented(), serials.at(-1), "and ignored");
    // A slow machine may have run fewer curls than the count below by now: let it reach it.
    await eventually(() => codes.length >= 10, 30_000);
    stop = true;
    await curlLoop;
    t.ok(codes.length >= 10, `curl ran all along (${codes.length} requests)`);
    t.same([...new Set(codes)], ["200"], "curl saw no failure");

    // Revocation with openssl: the client's session from before cannot be resumed.
    const sess = join(dir, "client.sess");
    const sClient = (extra: string[]) =>
      run(
        "openssl",
        [
          "s_client",
          "-connect",
          `127.0.0.1:${port}`,
          "-servername",
          "auth.ashchan.local",
          "-CAfile",
          join(pki, "ca.crt"),
          "-cert",
          join(pki, "client.crt"),
          "-key",
          join(pki, "client.key"),
          "-ign_eof",
          ...extra,
        ],
        {
          input: "GET /s HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        },
      );
    const before = await sClient(["-sess_out", sess]);
    t.match(before.out, /HTTP\/1\.1 200/);
    const reused = await sClient(["-sess_in", sess]);
    t.match(reused.out, /^Reused, TLSv1\.3/m, "the session resumes before revocation");
    await opensslOk(["ca", "-config", "ca.cnf", "-revoke", "client.crt"], cwd);
    await opensslOk(["ca", "-config", "ca.cnf", "-gencrl", "-out", "ca.crl"], cwd);
    writeFileSync(join(trust, "ca.crl.tmp"), read("ca.crl"));
    renameSync(join(trust, "ca.crl.tmp"), join(trust, "ca.crl"));
    t.ok(
      await eventually(() => logs.events("cert_reloaded").some((l) => l.trust_changed === true), 1_000),
      "the CRL is picked up within a second",
    );
    const after = await run("curl", curlArgs);
    t.not(after.out, "200", "curl with the revoked certificate fails");
    const resumedAfter = await sClient(["-sess_in", sess]);
    t.notMatch(resumedAfter.out, /HTTP\/1\.1/, "the old session gets no answer");
    t.notMatch(resumedAfter.out, /^Reused/m, "and was not resumed");
    t.ok(logs.events("mtls_handshake_failed").some((l) => l.reason === "revoked"));
  },
);

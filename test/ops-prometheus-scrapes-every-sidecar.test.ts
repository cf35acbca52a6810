// prometheus.yml is valid for Prometheus's own checker, loads the alert rules, and scrapes the
// admin port of every sidecar of compose/mesh.yaml (its services' and TCP servers') under its
// podman name, labelled with the SERVICE_NAME the sidecar logs with: a service added to (or
// removed from) the mesh without its scrape target fails here.
import { copyFileSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import t from "tap";
import { loadMesh } from "../config/mesh.js";
import { at, readYaml, run, tool } from "./lib/ops.js";

const promtool = tool("promtool", "prometheus");
const CONFIG = at("compose/prometheus/prometheus.yml");

interface PromConfig {
  rule_files?: string[];
  scrape_configs: Array<{
    job_name: string;
    metrics_path?: string;
    scheme?: string;
    static_configs?: Array<{ targets: string[]; labels?: Record<string, string> }>;
  }>;
}

t.test("promtool check config accepts prometheus.yml and finds the rule file", { skip: promtool.skip }, async (t) => {
  const result = await run(promtool.path as string, ["check", "config", CONFIG]);
  t.equal(result.code, 0, "promtool check config exits 0", { output: result.output });
  t.match(result.output, /SUCCESS: 1 rule files found/);
  t.match(result.output, /SUCCESS: \d+ rules found/, "and checks the rules it loads");
});

t.test(
  "promtool check config would catch a mistake (so the check above means something)",
  {
    skip: promtool.skip,
  },
  async (t) => {
    const dir = mkdtempSync(join(tmpdir(), "ashmesh-prom-"));
    t.teardown(() => rmSync(dir, { recursive: true, force: true }));
    const text = readFileSync(CONFIG, "utf8");
    // The rule file is missing next to the copy.
    writeFileSync(join(dir, "prometheus.yml"), text);
    const missing = await run(promtool.path as string, ["check", "config", join(dir, "prometheus.yml")]);
    t.not(missing.code, 0, "a missing rule file fails");
    t.match(missing.output, /alerts\.yml/);
    // A misspelt key.
    copyFileSync(at("compose/prometheus/alerts.yml"), join(dir, "alerts.yml"));
    writeFileSync(join(dir, "typo.yml"), text.replace("scrape_timeout:", "scrape_timout:"));
    const typo = await run(promtool.path as string, ["check", "config", join(dir, "typo.yml")]);
    t.not(typo.code, 0, "an unknown key fails");
    t.match(typo.output, /scrape_timout/);
  },
);

t.test("every sidecar of compose/mesh.yaml is a scrape target, and nothing else", async (t) => {
  const mesh = loadMesh(at("compose/mesh.yaml"));
  const config = readYaml<PromConfig>(CONFIG);
  t.same(config.rule_files, ["alerts.yml"], "rule_files loads alerts.yml next to it");
  const jobs = config.scrape_configs.filter((j) => j.job_name === "ashmesh");
  t.equal(jobs.length, 1, 'one job named ashmesh (the alerts select job="ashmesh")');
  const job = jobs[0];
  if (!job) return;
  t.equal(job.metrics_path ?? "/metrics", "/metrics");
  t.equal(job.scheme ?? "http", "http", "the admin port is plain HTTP");

  const targets = new Map<string, Record<string, string>>();
  for (const sc of job.static_configs ?? []) {
    for (const target of sc.targets) {
      t.notOk(targets.has(target), `${target} is listed once`);
      targets.set(target, sc.labels ?? {});
    }
  }
  const expected = new Set<string>();
  const sidecars = [...mesh.services, ...mesh.tcp];
  for (const s of sidecars) {
    const target = `${s.dnsName}:${mesh.ports.admin}`;
    expected.add(target);
    const labels = targets.get(target);
    t.ok(labels, `${s.key}: ${target} is scraped`);
    t.equal(labels?.service, s.serviceName, `${s.key}: labelled service="${s.serviceName}" (its SERVICE_NAME)`);
  }
  for (const target of targets.keys()) t.ok(expected.has(target), `${target} is a service of compose/mesh.yaml`);
  t.equal(targets.size, sidecars.length, `${sidecars.length} targets for ${sidecars.length} sidecars`);
});

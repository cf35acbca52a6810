// Loaded into every test process after tap's coverage hook (.taprc node-arg): processes a test
// starts (the CLI through tsx, sidecars, tools) record no coverage. tsx compiles the sources
// differently from tap's TypeScript loader, and c8 cannot merge two shapes of one file: it drops
// the file from the report. The CLI's code paths are covered in-process by the tests that call it.
process.env._TAPJS_PROCESSINFO_COVERAGE_ = "0";

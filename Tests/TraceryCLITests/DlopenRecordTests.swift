import Foundation
import Testing
import TraceryTestSupport

/// Objects loaded with `dlopen` while the program runs: traced from their load on (the agent
/// follows `dlopen` and `dlclose`).
@Suite struct DlopenRecordTests {
  /// A program loads a patchable plugin, calls it five times, closes it, loads it again and
  /// calls it once: every call of the plugin's functions is recorded under its names, across the
  /// close and the second load, whether the plugin is named by an absolute or a relative path,
  /// and the program prints what it prints untraced.
  @Test func aPluginLoadedWithDlopenIsRecorded() throws {
    let directory = try TestSupport.temporaryDirectory("record-dlopen")
    defer { try? FileManager.default.removeItem(at: directory) }
    let programs = RecordCommandTests.programs
    let plugin = directory.appendingPathComponent("libplugin.so").path
    let flags = ["-O2", "-fpatchable-function-entry=5"]
    try TestSupport.compile(
      compiler: "clang", sources: [programs.appendingPathComponent("plugin.c").path],
      flags: flags + ["-shared", "-fPIC"], output: plugin)
    let host = try RecordCommandTests.program("dlhost", compiler: "clang", flags: flags + ["-ldl"], in: directory)
    // Loaded by its absolute path, and by a relative one (the loader keeps it as given).
    let here = FileManager.default.currentDirectoryPath.split(separator: "/").count
    let relative = String(repeating: "../", count: here) + plugin.dropFirst()
    for (run, path) in [plugin, relative].enumerated() {
      let trace = directory.appendingPathComponent("trace-\(run)")
      let traced = try RecordCommandTests.record(trace, [host, path])
      #expect(traced.status == 0, "\(traced.stderr)")
      #expect(traced.stdout == "90\n")
      let counts = try RecordCommandTests.recordedCounts(trace)
      #expect(
        counts["call_plugin"] == 6 && counts["plugin_work"] == 6 && counts["plugin_helper"] == 12, "\(path): \(counts)")
    }
  }
}

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

  /// A C program opens a C++ plugin (RTLD_LOCAL, as interpreters open their extensions) whose
  /// every call throws through a traced frame and catches: the plugin's C++ runtime and unwinder
  /// are not in the global scope, where the agent's `__cxa_begin_catch` and `_Unwind_*`
  /// interposers first looked for what they forward to (the catch called address 0 and the
  /// program died of SIGSEGV). Recorded, it prints what it prints untraced, and its calls are
  /// recorded (the thrower's without an exit).
  @Test func aCxxPluginOfACProgramThrowsAndCatches() throws {
    let directory = try TestSupport.temporaryDirectory("record-cxx-plugin")
    defer { try? FileManager.default.removeItem(at: directory) }
    let plugin = directory.appendingPathComponent("libcxxplugin.so").path
    try TestSupport.compile(
      compiler: "g++", sources: [RecordCommandTests.programs.appendingPathComponent("cxxplugin.cpp").path],
      flags: ["-O2", "-fpatchable-function-entry=5", "-shared", "-fPIC"], output: plugin)
    let host = try RecordCommandTests.program("dlhost", compiler: "gcc", flags: ["-O2", "-ldl"], in: directory)
    let untraced = try TestSupport.run(host, [plugin])
    #expect(untraced.status == 0 && untraced.stdout == "90\n", "\(untraced.stderr)")
    let trace = directory.appendingPathComponent("trace")
    let traced = try RecordCommandTests.record(trace, [host, plugin])
    #expect(traced.status == 0, "\(traced.stderr)")
    #expect(traced.stdout == "90\n")
    let counts = try RecordCommandTests.recordedCounts(trace)
    #expect(counts["plugin_work"] == 6, "\(counts)")
  }

  /// `-l --patch GLOB` where only a library the program loads later has what the glob names
  /// (java's libjvm, loaded by its launcher): not refused at the start (it says so), and the
  /// plugin's functions, built without patch sites, are recorded from its load on.
  @Test func aGlobForALibraryLoadedLaterIsNotRefused() throws {
    let directory = try TestSupport.temporaryDirectory("record-dlopen-glob")
    defer { try? FileManager.default.removeItem(at: directory) }
    let plugin = directory.appendingPathComponent("libplugin.so").path
    try TestSupport.compile(
      compiler: "gcc", sources: [RecordCommandTests.programs.appendingPathComponent("plugin.c").path],
      flags: ["-O2", "-shared", "-fPIC"], output: plugin)
    let host = try RecordCommandTests.program("dlhost", compiler: "gcc", flags: ["-O2", "-ldl"], in: directory)
    let trace = directory.appendingPathComponent("trace")
    let traced = try RecordCommandTests.record(trace, [host, plugin], options: ["-l", "--patch", "plugin_*"])
    #expect(traced.status == 0 && traced.stdout == "90\n", "\(traced.stderr)")
    #expect(traced.stderr.contains("no function matches 'plugin_*' yet"), "\(traced.stderr)")
    let counts = try RecordCommandTests.recordedCounts(trace)
    #expect(counts["plugin_work"] == 6, "\(counts)")
    // A program with patch sites, without -l: nothing reaches a library's functions without
    // sites, and a glob that matches nothing stays an error.
    let patchable = try RecordCommandTests.program(
      "dlhost", compiler: "gcc", flags: ["-O2", "-ldl", "-fpatchable-function-entry=5"], in: directory)
    let refused = try RecordCommandTests.record(
      directory.appendingPathComponent("t2"), [patchable, plugin], options: ["--patch", "plugin_*"])
    #expect(
      refused.status != 0 && refused.stderr.contains("no patchable function matches 'plugin_*'"), "\(refused.stderr)")
  }
}

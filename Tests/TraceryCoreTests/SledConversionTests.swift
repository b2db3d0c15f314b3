import Foundation
import Testing
import TraceryTestSupport

/// gcc `-fpatchable-function-entry=5` sleds, converted in a single-threaded process of our own
/// (tracery-testhost), then live-patched, called and restored.
@Suite struct SledConversionTests {
  @Test(arguments: [[], ["-fcf-protection=full"]])
  func convertsGccSledsWhileAlone(extraFlags: [String]) throws {
    let directory = try TestSupport.temporaryDirectory("tracery-sled")
    let source = directory.appendingPathComponent("sled.c").path
    let library = directory.appendingPathComponent("libsled.so").path
    try TestSupport.writeGeneratedFunctions(count: 200, prefix: "sl_f", to: source)
    try TestSupport.compile(
      compiler: "gcc", sources: [source],
      flags: ["-O1", "-shared", "-fPIC", "-fpatchable-function-entry=5"] + extraFlags,
      output: library)
    let host = TestSupport.productsDirectory.appendingPathComponent("tracery-testhost").path
    let result = try TestSupport.run(host, ["sleds", library, "sl_f", "200"])
    #expect(result.status == 0, "\(result.stdout)\(result.stderr)")
    #expect(
      result.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
        == "before=5×nop sled converted=200 patched=200 wrong=0 counted=200 unpatched=200 after=nop5 "
        + "again=skipped: already a 5-byte NOP")
  }
}

/// Traps that are not at a site being patched go to the SIGTRAP handler installed before ours.
@Suite struct TrapChainingTests {
  @Test func foreignTrapsReachThePreviousHandler() throws {
    let host = TestSupport.productsDirectory.appendingPathComponent("tracery-testhost").path
    let result = try TestSupport.run(host, ["chain"])
    #expect(result.status == 0, "\(result.stdout)\(result.stderr)")
    #expect(result.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == "int3=7 previous=2 handled=0")
  }
}

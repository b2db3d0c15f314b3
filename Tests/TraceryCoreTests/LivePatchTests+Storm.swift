import Foundation
import Testing
import TraceryFixtures
import TraceryTestSupport
import TraceryX86

@testable import TraceryCore

// Part of LivePatchTests (a serialized suite): every test there rewrites the same fixture sites.
extension PatchingTests.LivePatchTests {
  /// Two threads call the four fixtures in a loop and check every result while this thread
  /// cycles their sites nop → call A → nop → jmp B → nop, one batch per step: 100,000 patches
  /// and 100,000 unpatches by default (TRACERY_LONG_TESTS: 20 times more).
  @Test func twoThreadsCallWhileSitesAreRewritten() throws {
    let batches = 2 * TestSupport.stormIterations(default: 100_000, long: 2_000_000)
    let sites = try FixtureSites.sites()
    let originals = sites.map { TextPatcher.read($0) }
    let callProbes = try CountingTrampolines(sites: sites, mode: .call)
    let jmpProbes = try CountingTrampolines(sites: sites, mode: .jmp)
    func state(_ step: Int, _ index: Int) -> [UInt8] {
      switch step % 4 {
      case 1: return callProbes.branch(index)
      case 3: return jmpProbes.branch(index)
      default: return originals[index]
      }
    }
    let trapsBefore = TrapStatistics.handled
    tracery_fixture_hammers_start(2)
    var failures: [String] = []
    for step in 0..<batches {
      let requests = sites.indices.map {
        PatchRequest(site: sites[$0], expected: state(step, $0), replacement: state(step + 1, $0))
      }
      let outcomes = TextPatcher.shared.apply(requests)
      if outcomes.contains(where: { $0 != .patched }) {
        failures.append("batch \(step): \(outcomes)")
        break
      }
    }
    // An even number of batches ends unpatched: every site is as it was.
    var wrong: UInt64 = 0
    let calls = tracery_fixture_hammers_stop(&wrong)
    #expect(failures.isEmpty, "\(failures)")
    #expect(wrong == 0, "wrong results: \(wrong) of \(calls) calls")
    #expect(calls > 0)
    #expect(sites.map { TextPatcher.read($0) } == originals)
    let counted = sites.indices.reduce(UInt64(0)) { $0 + callProbes.count($1) + jmpProbes.count($1) }
    #expect(counted > 0 && counted <= calls, "counted \(counted) of \(calls) calls")
    // The storm is about threads that meet a site mid-batch: some did, and the handler took them.
    #expect(TrapStatistics.handled > trapsBefore, "no thread ever met an int3: the protocol went untested")
    print(
      "storm: \(batches / 2) patches and \(batches / 2) unpatches, \(calls) checked calls, \(counted) counted, "
        + "\(TrapStatistics.handled - trapsBefore) traps emulated"
    )
  }
}

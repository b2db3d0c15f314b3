import Testing
import TraceryELF
import TraceryFixtures
import TraceryX86

@testable import TraceryCore

/// The fixtures' patch sites, found through the symbol table of the test executable itself.
enum FixtureSites {
  static let names = ["tracery_fixture_add", "tracery_fixture_mul3", "tracery_fixture_mix", "tracery_fixture_sub"]

  static func sites() throws -> [UInt64] {
    let main = ProcessObjects.list()[0]
    let table = try SymbolTable([SymbolTable.Input(path: main.path, bias: main.bias, file: ELFFile(path: main.path))])
    return try names.map { name in
      let found = table.functions(named: name)
      #expect(found.count == 1, "\(name) should be defined once")
      let index = try #require(found.first)
      return try #require(table.functions[index].site, "\(name) has no patch site")
    }
  }
}

/// The suites that rewrite fixture sites or run storms. They never overlap: a storm's patcher
/// thread (a libdispatch worker, which blocks signals, running flat out) cannot be inspected by
/// the trampoline reclaimer, which would then keep every retired image of the Tracer tests.
@Suite(.serialized) struct PatchingTests {}

extension PatchingTests {
  @Suite(.serialized) struct LivePatchTests {
    @Test func patchesFixtureToCountingTrampolineAndBack() throws {
      let sites = try FixtureSites.sites()
      let originals = sites.map { TextPatcher.read($0) }
      for original in originals { #expect(X86Instruction.SiteShape(bytes: original, at: 0) == .nop5) }
      let probes = try CountingTrampolines(sites: sites, mode: .call)
      let patch = sites.indices.map {
        PatchRequest(site: sites[$0], expected: originals[$0], replacement: probes.branch($0))
      }
      #expect(TextPatcher.shared.apply(patch) == Array(repeating: .patched, count: sites.count))
      #expect(tracery_fixture_add(40, 2) == 42)
      #expect(tracery_fixture_mul3(5) == 15)
      #expect(tracery_fixture_add(1, 2) == 3)
      #expect(probes.count(0) == 2)
      #expect(probes.count(1) == 1)
      #expect(probes.count(2) == 0)
      let unpatch = sites.indices.map {
        PatchRequest(site: sites[$0], expected: probes.branch($0), replacement: originals[$0])
      }
      #expect(TextPatcher.shared.apply(unpatch) == Array(repeating: .patched, count: sites.count))
      #expect(tracery_fixture_add(40, 2) == 42)
      #expect(probes.count(0) == 2)
      #expect(sites.map { TextPatcher.read($0) } == originals)
    }

    @Test func refusesWrongBytesAndKeepsGoing() throws {
      let sites = try FixtureSites.sites()
      let originals = sites.map { TextPatcher.read($0) }
      let probes = try CountingTrampolines(sites: sites, mode: .jmp)
      var requests = sites.indices.map {
        PatchRequest(site: sites[$0], expected: originals[$0], replacement: probes.branch($0))
      }
      requests[1] = PatchRequest(
        site: sites[1], expected: [0x90, 0x90, 0x90, 0x90, 0x90], replacement: probes.branch(1))
      let outcomes = TextPatcher.shared.apply(requests)
      #expect(outcomes[0] == .patched)
      guard case .failed(let reason) = outcomes[1] else {
        Issue.record("expected a failure, got \(outcomes[1])")
        return
      }
      #expect(reason.contains("expected 90 90 90 90 90"))
      #expect(outcomes[2] == .patched && outcomes[3] == .patched)
      #expect(TextPatcher.read(sites[1]) == originals[1])
      #expect(tracery_fixture_add(2, 3) == 5 && tracery_fixture_mul3(2) == 6 && tracery_fixture_sub(9, 4) == 5)
      #expect(probes.count(0) == 1 && probes.count(1) == 0 && probes.count(3) == 1)
      // Applying the same change again is a skip, not a failure.
      #expect(
        TextPatcher.shared.apply([requests[0]]) == [
          .skipped("already holds \(TextPatcher.hex(requests[0].replacement))")
        ]
      )
      let undo = [0, 2, 3].map {
        PatchRequest(site: sites[$0], expected: probes.branch($0), replacement: originals[$0])
      }
      #expect(TextPatcher.shared.apply(undo) == [.patched, .patched, .patched])
      #expect(sites.map { TextPatcher.read($0) } == originals)
    }

    @Test func refusesNonExecutableAndUnsupportedBytes() throws {
      let heap = UnsafeMutablePointer<UInt8>.allocate(capacity: 8)
      defer { heap.deallocate() }
      let address = UInt64(UInt(bitPattern: heap))
      let outcome = TextPatcher.shared.apply([
        PatchRequest(site: address, expected: X86Instruction.nop5, replacement: X86Instruction.nop5.reversed())
      ])
      guard case .failed = outcome[0] else {
        Issue.record("patching heap memory should fail, got \(outcome[0])")
        return
      }
      let site = try FixtureSites.sites()[0]
      let bad = TextPatcher.shared.apply([
        PatchRequest(site: site, expected: TextPatcher.read(site), replacement: [0xcc, 0xcc, 0xcc, 0xcc, 0xcc])
      ])
      #expect(bad[0].description.contains("is not a nop5, call rel32 or jmp rel32"))
    }
  }
}

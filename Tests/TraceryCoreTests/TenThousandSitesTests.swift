import Foundation
import Testing
import TraceryELF
import TraceryTestSupport
import TraceryX86

@testable import TraceryCore

/// A generated shared object of 10,000 functions, built with clang, loaded into the test process.
enum GeneratedLibrary {
  typealias Function = @convention(c) (Int) -> Int

  struct Loaded: @unchecked Sendable {
    // @unchecked: the handle and function pointers are immutable after loading.
    let path: String
    let functions: [Function]
    let sites: [UInt64]
  }

  static let tenThousand: Result<Loaded, any Error> = Result { try load(count: 10_000, prefix: "tr_f") }

  static func load(count: Int, prefix: String, compiler: String = "clang", flags: [String] = []) throws -> Loaded {
    let directory = try TestSupport.temporaryDirectory("tracery-gen")
    let source = directory.appendingPathComponent("gen.c").path
    let library = directory.appendingPathComponent("libgen.so").path
    try TestSupport.writeGeneratedFunctions(count: count, prefix: prefix, to: source)
    try TestSupport.compile(
      compiler: compiler, sources: [source],
      flags: ["-O1", "-shared", "-fPIC", "-fpatchable-function-entry=5"] + flags, output: library)
    guard let handle = dlopen(library, RTLD_NOW | RTLD_LOCAL) else {
      throw TestSupport.CompileError(description: "dlopen \(library): \(String(cString: dlerror()))")
    }
    let table = dlsym(handle, "\(prefix)table")!.assumingMemoryBound(to: Optional<Function>.self)
    let functions = (0..<count).map { table[$0]! }
    let entry = try #require(ProcessObjects.list().first { $0.path == library })
    let symbols = try SymbolTable([SymbolTable.Input(path: library, bias: entry.bias, file: ELFFile(path: library))])
    let sites = try (0..<count).map { index -> UInt64 in
      let found = symbols.functions(named: "\(prefix)\(index)")
      let function = symbols.functions[try #require(found.first)]
      #expect(UInt64(UInt(bitPattern: unsafeBitCast(functions[index], to: UnsafeRawPointer.self))) == function.address)
      return try #require(function.site)
    }
    return Loaded(path: library, functions: functions, sites: sites)
  }
}

extension PatchingTests {
  @Suite(.serialized) struct TenThousandSitesTests {
    /// Every one of 10,000 functions patched to its counting trampoline in one batch, called, and
    /// unpatched in one batch: each call counted exactly once while patched and never after; every
    /// site's bytes as they were.
    @Test func patchAndUnpatchTenThousandInOneBatchEach() throws {
      let library = try GeneratedLibrary.tenThousand.get()
      let sites = library.sites
      let originals = sites.map { TextPatcher.read($0) }
      #expect(originals.allSatisfy { X86Instruction.SiteShape(bytes: $0, at: 0) == .nop5 })
      let probes = try CountingTrampolines(sites: sites, mode: .call)

      // One batch: three core syncs and a handful of mprotect ranges for all 10,000 sites.
      let patched = TextPatcher.shared.applyReporting(
        sites.indices.map { PatchRequest(site: sites[$0], expected: originals[$0], replacement: probes.branch($0)) })
      #expect(patched.outcomes.allSatisfy { $0 == .patched })
      #expect(patched.coreSyncs == 3)
      #expect(patched.writableRanges >= 1 && patched.writableRanges <= 4)
      var wrong = 0
      for (index, function) in library.functions.enumerated() {
        for x in [1, 2] where function(x) != TestSupport.generatedValue(index: index, x: x) { wrong += 1 }
        if index % 2 == 0 { _ = function(3) }
      }
      #expect(wrong == 0)
      let miscounted = sites.indices.filter { probes.count($0) != ($0 % 2 == 0 ? 3 : 2) }
      #expect(miscounted.isEmpty, "first miscounted: \(miscounted.prefix(5).map { ($0, probes.count($0)) })")

      let unpatched = TextPatcher.shared.applyReporting(
        sites.indices.map { PatchRequest(site: sites[$0], expected: probes.branch($0), replacement: originals[$0]) })
      #expect(unpatched.outcomes.allSatisfy { $0 == .patched })
      #expect(unpatched.coreSyncs == 3)
      for (index, function) in library.functions.enumerated()
      where function(5) != TestSupport.generatedValue(index: index, x: 5) {
        wrong += 1
      }
      #expect(wrong == 0)
      #expect(sites.indices.allSatisfy { probes.count($0) == ($0 % 2 == 0 ? 3 : 2) })
      #expect(sites.map { TextPatcher.read($0) } == originals)
    }

    /// gcc's 5×1-byte NOP sleds cannot be rewritten while other threads run (the test process has
    /// many): every site is refused with that reason and left untouched.
    @Test func sledsAreRefusedWhileOtherThreadsRun() throws {
      let library = try GeneratedLibrary.load(count: 16, prefix: "sled_f", compiler: "gcc")
      let before = library.sites.map { TextPatcher.read($0) }
      #expect(before.allSatisfy { $0 == [0x90, 0x90, 0x90, 0x90, 0x90] })
      let outcomes = TextPatcher.shared.convertSleds(library.sites)
      for outcome in outcomes {
        guard case .failed(let reason) = outcome else {
          Issue.record("expected a refusal, got \(outcome)")
          continue
        }
        #expect(reason.contains("other thread"))
      }
      #expect(library.sites.map { TextPatcher.read($0) } == before)
      // A live patch that expects a NOP5 there is refused too, naming the bytes it found.
      let refused = TextPatcher.shared.apply([
        PatchRequest(site: library.sites[0], expected: X86Instruction.nop5, replacement: X86Instruction.nop5.reversed())
      ])
      #expect(refused.count == 1)
    }
  }
}

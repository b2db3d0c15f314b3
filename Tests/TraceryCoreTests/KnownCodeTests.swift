import Foundation
import Testing
import TraceryFixtures

@testable import TraceryCore

#if canImport(Glibc)
  import Glibc
#endif

/// Which code may call a graph-traced function and be traced (`KnownCode`): named executable
/// mappings, the program's text first, a foreign run cut out; a call from elsewhere (a JIT's
/// code) keeps its return address.
@Suite struct KnownCodeTableTests {
  @Test func onlyNamedExecutableMappingsAreKnown() {
    // (An anonymous mapping's line may end in spaces.)
    let text = [
      "1000-2000 r-xp 00000000 08:01 42                         /usr/bin/node",
      "2000-3000 r--p 00001000 08:01 42                         /usr/bin/node",
      "4000-5000 r-xp 00000000 00:00 0 ",
      "6000-7000 r-xp 00000000 00:00 0                          [anon:v8 code]",
      "7000-8000 r-xp 00000000 00:00 0                          [vdso]",
      "9000-a000 r-xp 00000000 00:01 7                          /memfd:doublemapper (deleted)",
      "a000-b000 r-xp 00000000 08:01 9                          /tmp/memfd:not one",
      "b000-c000 rwxp 00000000 00:00 0",
    ].joined(separator: "\n")
    let map = MemoryMap(parsing: Array((text + "\n").utf8))
    #expect(map.regions.count == 8)
    #expect(map.regions.map(\.named) == [true, false, false, false, true, false, true, false])
    #expect(KnownCode.objects(in: map) == [0x1000..<0x2000, 0x7000..<0x8000, 0xa000..<0xb000])
  }

  @Test func rangesAreMergedCutAndTheProgramsFirst() {
    let ranges: [Range<UInt64>] = [0x9000..<0xa000, 0x1000..<0x2000, 0x2000..<0x3000, 0x5000..<0x8000, 0x5800..<0x6000]
    #expect(
      KnownCode.ranges(ranges, excluding: nil, first: 0x1000) == [0x1000..<0x3000, 0x5000..<0x8000, 0x9000..<0xa000])
    // The program's text (holding `first`) leads; an excluded run splits the range it lies in.
    #expect(
      KnownCode.ranges(ranges, excluding: 0x6000..<0x7000, first: 0x7800)
        == [0x7000..<0x8000, 0x1000..<0x3000, 0x5000..<0x6000, 0x9000..<0xa000])
    #expect(KnownCode.ranges(ranges, excluding: 0x0..<0x3000, first: 0x1000) == [0x5000..<0x8000, 0x9000..<0xa000])
  }
}

extension PatchingTests {
  @Suite(.serialized) struct KnownCodeTests {
    /// A call from anonymous executable memory (a JIT's code) is not traced and returns straight
    /// to its caller; the same function called from the program's code is, whether its text is
    /// the range compared inline (`first` in it) or one found in the table (`first` in libc).
    /// Publishing the table again retires the old one, which the reclaimer frees.
    @Test(arguments: ["test program", "libc"])
    func callsFromAnonymousCodeAreLeftUntraced(_ inline: String) throws {
      let tracer = Tracer()
      let symbol: UnsafeMutableRawPointer? = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "getpid")
      let found = try #require(symbol)
      let libc = UInt64(UInt(bitPattern: found))
      let first = inline == "libc" ? libc : GraphFixture.leaf
      tracer.traceGraphCallsOnlyFromKnownCode(excluding: nil, first: first)
      let link = try tracer.attachGraph(
        .handlers(entry: GraphFixture.entry, exit: GraphFixture.exit), to: .addresses([GraphFixture.leaf]),
        dataWords: 1)
      defer { link.detach() }
      // sub $8, %rsp; movabs $leaf, %rax; call *%rax; add $8, %rsp; ret
      var code: [UInt8] =
        [0x48, 0x83, 0xec, 0x08, 0x48, 0xb8] + withUnsafeBytes(of: GraphFixture.leaf.littleEndian, Array.init)
      code += [0xff, 0xd0, 0x48, 0x83, 0xc4, 0x08, 0xc3]
      let page = try #require(
        mmap(nil, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0).flatMap {
          $0 == MAP_FAILED ? nil : $0
        })
      defer { munmap(page, 4096) }
      page.copyMemory(from: code, byteCount: code.count)
      #expect(mprotect(page, 4096, PROT_READ | PROT_EXEC) == 0)
      let jitted = unsafeBitCast(page, to: GraphFixture.Unary.self)

      tracery_graph_events_reset()
      #expect(tracery_graph_leaf(3) == 30)
      #expect(GraphFixture.events.map(\.kind) == [1, 2])
      tracery_graph_events_reset()
      #expect(jitted(4) == 40)
      #expect(GraphFixture.events.isEmpty)
      #expect(GraphThreads.depth == 0)

      let retired = tracer.retiredTrampolines
      tracer.traceGraphCallsOnlyFromKnownCode(excluding: nil, first: first)
      #expect(tracer.retiredTrampolines == retired + 1)
      tracery_graph_events_reset()
      #expect(tracery_graph_leaf(5) == 50 && jitted(6) == 60)
      #expect(GraphFixture.events.map(\.kind) == [1, 2])
      #expect(tracer.reclaim() >= 1)
    }
  }
}

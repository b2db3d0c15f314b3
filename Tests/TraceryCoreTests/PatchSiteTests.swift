import CTraceryShims
import Foundation
import Synchronization
import Testing
import TraceryFixtures
import TraceryX86

@testable import TraceryCore

/// `PatchSite` is the one place that says where a function is patched and where its code goes on;
/// the patcher's trap emulation and the multi-attach stub take the body from it.
@Suite struct PatchSiteTests {
  @Test func aNopSiteResumesAfterItsBranch() throws {
    let site = try PatchSite.at(OpsFixture.f1)
    #expect(site.shape == .nop && site.function == OpsFixture.f1)
    // At the entry, or after an endbr64 when the compiler put one there.
    #expect(site.address == OpsFixture.f1 || site.address == OpsFixture.f1 + 4)
    #expect(site.resume == site.address + 5 && site.length == 5 && site.bodyFollowsBranch)
  }

  @Test func aFunctionWithoutANopSaysWhatItHolds() {
    // A Swift function: swiftc has no patchable-entry flag.
    let swiftFunction = unsafeBitCast(
      PatchSiteTests.plainSwiftFunction as @convention(c) (Int) -> Int, to: UInt64.self)
    let error = #expect(throws: PatchSiteError.self) { try PatchSite.at(swiftFunction) }
    #expect(error?.reason.contains("not a 5-byte NOP") == true, "\(String(describing: error))")
  }

  static let plainSwiftFunction: @convention(c) (Int) -> Int = { $0 &* 3 &+ 1 }

  static let trapEntries = Atomic<Int>(0)
  static let trapExits = Atomic<Int>(0)

  /// Functions without a NOP traced while other threads run (this test process has several): a
  /// Swift function's prologue is relocated live when every thread can be seen out of its
  /// first bytes, else (here: the callers inherit a mask that blocks the snapshot signal, and
  /// never block in a system call) the relocation is abandoned and the function traced through
  /// an int3 instead; a 4-byte C function gets a trap site. Two threads call the function all
  /// along while it is attached and detached ten times: every call returns what it should, the
  /// handlers see the calls made while attached, and its bytes come back after each detach.
  /// (`tracery-testhost relocate-live` checks the live relocation itself.)
  @Test(arguments: [("relocated", [0xe9, 0xcc]), ("trap", [0xcc])])
  func functionsWithoutNopsAreTracedWhileOtherThreadsRun(shape: String, firstBytes: [Int]) throws {
    let tracer = Tracer()
    tracer.relocatesPrologues = true
    let function: @convention(c) (Int) -> Int
    let address: UInt64
    let expected: @Sendable (Int) -> Int
    if shape == "relocated" {
      function = PatchSiteTests.plainSwiftFunction
      address = unsafeBitCast(function, to: UInt64.self)
      expected = { $0 &* 3 &+ 1 }
    } else {
      function = tracery_fixture_short
      address = UInt64(UInt(bitPattern: unsafeBitCast(function, to: UnsafeRawPointer.self)))
      expected = { $0 }
    }
    let before = SiteBytes(reading: PatchSite.afterEndbr64(address))
    let stop = Atomic<Bool>(false)
    let wrong = Atomic<Int>(0)
    let calls = Atomic<Int>(0)
    let callers = (0..<2).map { _ in
      Thread {
        var n = 0
        while !stop.load(ordering: .relaxed) {
          if function(n) != expected(n) { wrong.add(1, ordering: .relaxed) }
          n += 1
        }
        calls.add(n, ordering: .relaxed)
      }
    }
    for caller in callers { caller.start() }
    defer { stop.store(true, ordering: .relaxed) }
    let entriesBefore = Self.trapEntries.load(ordering: .relaxed)
    let model = FunctionModel(integerArguments: 1, stackArgumentWords: 0, returns: .integer)
    for _ in 0..<10 {
      let entry = try tracer.attach(
        .entry({ _, _ in PatchSiteTests.trapEntries.add(1, ordering: .relaxed) }), to: .address(address))
      let exit = try tracer.attach(
        .exit({ _, _ in PatchSiteTests.trapExits.add(1, ordering: .relaxed) }), to: .address(address), model: model)
      #expect(firstBytes.contains(Int(SiteBytes(reading: PatchSite.afterEndbr64(address)).byte(0))))
      #expect(function(4) == expected(4))
      usleep(2_000)
      exit.detach()
      entry.detach()
      #expect(SiteBytes(reading: PatchSite.afterEndbr64(address)) == before)
    }
    stop.store(true, ordering: .relaxed)
    while callers.contains(where: { !$0.isFinished }) { usleep(1_000) }
    #expect(wrong.load(ordering: .relaxed) == 0)
    let entries = Self.trapEntries.load(ordering: .relaxed) - entriesBefore
    #expect(entries >= 10)
    #expect(calls.load(ordering: .relaxed) > entries / 2)
    #expect(tracer.reclaim() >= 0)
  }

  /// A thread that traps at every call (a trap site) spends most of its time in the SIGTRAP
  /// handler, whose signal frame holds the site + 1 until the handler sends it on. A snapshot
  /// taken there would show the thread inside the site's first bytes, and a relocation under way
  /// would give up on them (seen: `record -p` on gcc's NOP sleds dropped the hottest functions).
  /// The handler holds the snapshot signal off and answers as it ends: every look finds the
  /// thread where it resumes, never inside the site's moved instruction.
  @Test func aThreadInTheTrapHandlerIsSeenWhereItResumes() throws {
    let tracer = Tracer()
    tracer.relocatesPrologues = true
    let function: @convention(c) (Int) -> Int = tracery_fixture_short_other
    let address = UInt64(UInt(bitPattern: unsafeBitCast(function, to: UnsafeRawPointer.self)))
    let site = PatchSite.afterEndbr64(address)
    // Its first instruction (`mov %rdi, %rax`, 3 bytes) moves; its copy jumps back to the `ret`
    // after it, where a look may find the thread: only the moved instruction's inside counts.
    let moved = try PatchSite.trap(at: address, function: address, size: 4).length
    try #require(moved == 3)
    let link = try tracer.attach(.entry({ _, _ in }), to: .address(address))
    defer { link.detach() }
    try #require(SiteBytes(reading: site).byte(0) == 0xcc)
    let stop = Atomic<Bool>(false)
    let callerID = Atomic<Int32>(0)
    let caller = Thread {
      // The runner's threads inherit a mask that blocks the snapshot signal: this one takes it.
      var snapshot = sigset_t()
      sigemptyset(&snapshot)
      sigaddset(&snapshot, ctracery_snapshot_signal())
      pthread_sigmask(SIG_UNBLOCK, &snapshot, nil)
      callerID.store(ctracery_gettid(), ordering: .relaxed)
      var n = 0
      while !stop.load(ordering: .relaxed) {
        _ = function(n)
        n += 1
      }
    }
    caller.start()
    defer { stop.store(true, ordering: .relaxed) }
    while callerID.load(ordering: .relaxed) == 0 { usleep(100) }
    let tid = callerID.load(ordering: .relaxed)
    let inside = (site + 1)..<(site + UInt64(moved))
    let trapsBefore = TrapStatistics.handled
    var seenInside = 0
    var unanswered = 0
    // (This thread only: other tests' threads may run beside it, some of them uninspectable.)
    for _ in 0..<300 {
      guard let (rip, rsp, others, _) = Reclaimer.registers(of: tid) else {
        unanswered += 1
        continue
      }
      var words = [rip] + others
      if let region = MemoryMap.current().region(containing: rsp) {
        var at = rsp & ~7
        while at + 8 <= region.end {
          words.append(UnsafePointer<UInt64>(bitPattern: UInt(at))!.pointee)
          at += 8
        }
      }
      if words.contains(where: inside.contains) { seenInside += 1 }
    }
    stop.store(true, ordering: .relaxed)
    while !caller.isFinished { usleep(1_000) }
    #expect(TrapStatistics.handled - trapsBefore > 1000)
    #expect(
      seenInside == 0 && unanswered == 0, "inside the site at \(seenInside) of 300 looks, \(unanswered) unanswered")
  }

  /// How a function without a NOP is decided (`PatchSite.survey`, the code as bytes): the whole
  /// instructions covering 5 bytes move; a branch to its sixth byte is no obstacle (only the
  /// first 5 are overwritten), one into its first 5 bytes makes it a trap site; so does being
  /// 4 bytes long.
  @Test func onlyTheFirstFiveBytesMatter() {
    func survey(_ bytes: [UInt8]) -> PatchSite.Survey {
      let padded = bytes + [UInt8](repeating: 0xcc, count: 16)
      return padded.withUnsafeBytes { raw in
        PatchSite.survey(code: UnsafeRawBufferPointer(rebasing: raw[0..<bytes.count]), entry: 0x40_1000)
      }
    }
    // push rbp; mov rbp, rsp; lea rax, [rdi + 1]; pop rbp; ret
    #expect(survey([0x55, 0x48, 0x89, 0xe5, 0x48, 0x8d, 0x47, 0x01, 0x5d, 0xc3]) == .relocated(length: 8))
    // mov eax, edi; add eax, 1; 1: add eax, 2; cmp eax, 100; jl 1b; ret — the loop enters +5.
    let loop: [UInt8] = [0x89, 0xf8, 0x83, 0xc0, 0x01, 0x83, 0xc0, 0x02, 0x83, 0xf8, 0x64, 0x7c, 0xf8, 0xc3]
    #expect(survey(loop) == .relocated(length: 5))
    // mov eax, edi; 1: add eax, 2; cmp eax, 100; jl 1b; ret — the loop enters +2.
    let inside: [UInt8] = [0x89, 0xf8, 0x83, 0xc0, 0x02, 0x83, 0xf8, 0x64, 0x7c, 0xf8, 0xc3]
    #expect(survey(inside) == .trap(.branchedInto))
    #expect(survey([0x48, 0x89, 0xf8, 0xc3]) == .trap(.short))
    // The same 4 bytes followed by gcc's padding up to the next function move whole; followed at
    // once by the next function, they trap.
    let padding: [UInt8] = [0x66, 0x66, 0x2e, 0x0f, 0x1f, 0x84, 0, 0, 0, 0, 0, 0x90]
    let padded = ([0x48, 0x89, 0xf8, 0xc3] + padding).withUnsafeBytes { raw in
      PatchSite.survey(code: raw, size: 4, entry: 0x40_1000)
    }
    #expect(padded == .relocated(length: 5))
    let crowded = ([0x48, 0x89, 0xf8, 0xc3, 0x48, 0x8d, 0x47, 0x02, 0xc3] as [UInt8]).withUnsafeBytes { raw in
      PatchSite.survey(code: UnsafeRawBufferPointer(rebasing: raw[0..<4]), size: 4, entry: 0x40_1000)
    }
    #expect(crowded == .trap(.short))
  }

  /// A request owns the bytes it changes and its first: a trap site's (`int3` and its own next
  /// 4 bytes) only its first, so a function that starts within those 4 bytes may change in the
  /// same batch.
  @Test func aTrapSiteOwnsItsFirstByteOnly() {
    let original = SiteBytes([0x48, 0x89, 0xf8, 0xc3, 0x48])!
    #expect(original.changed(to: SiteBytes([0xcc, 0x89, 0xf8, 0xc3, 0x48])!) == 0b00001)
    #expect(original.changed(to: SiteBytes([0xe8, 0x89, 0, 0, 0x48])!) == 0b01101)
    #expect(SiteBytes.mask(0b01101) == 0x00_ff_ff_00_ff && SiteBytes.mask(SiteBytes.whole) == 0xff_ffff_ffff)
  }

  /// A thread that traps on a site being put back goes to its resume address, whatever it is.
  @Test func theTrapHandlerSendsThreadsToTheResumeAddress() {
    let nop = SiteBytes(raw: 0x0044_1f0f)
    let sites = [
      TextPatcher.AcceptedSite(
        request: 0, address: 0x1000, replacement: nop, kind: CTRACERY_POKE_SKIP, owned: SiteBytes.whole, resume: 0x1005),
      TextPatcher.AcceptedSite(
        request: 1, address: 0x2000, replacement: nop, kind: CTRACERY_POKE_SKIP, owned: SiteBytes.whole, resume: 0x9000),
    ]
    let table = PokeTable(sites)
    let pokes = table.header.pointee.pokes!
    #expect(pokes[0].target == 0x1005 && pokes[1].target == 0x9000)
  }

  /// A multi-attach stub names its site and jumps to the site's resume address, which need not
  /// follow the site.
  @Test func aMultiStubJumpsToTheResumeAddress() throws {
    let arena = CodeArena()
    let block = try arena.allocate(near: OpsFixture.f1, size: MultiStub.size)
    defer { arena.release(block) }
    let patch = PatchSite(
      function: OpsFixture.f2, address: OpsFixture.f2, resume: OpsFixture.f3, length: 5, shape: .nop)
    let bytes = try #require(MultiStub.bytes(at: block.address, patch: patch, trampoline: OpsFixture.f4))
    #expect(bytes.count == MultiStub.size)
    block.write(bytes)
    #expect(MultiStub.site(of: block.address) == OpsFixture.f2)
    #expect(MultiStub.trampoline(of: block.address) == OpsFixture.f4)
    #expect(
      X86Instruction.branchTarget(
        Array(bytes[Int(MultiStub.bodyOffset)..<Int(MultiStub.bodyOffset) + 5]),
        at: block.address + UInt64(MultiStub.bodyOffset)) == OpsFixture.f3)
  }
}

extension PatchSiteTests {
  /// The searches that decide each function of an object in address order start from the last
  /// answer (`firstIndex(notBelow:by:from:)`): from any hint, right or wrong, they answer as a
  /// binary search of the whole does (sorted values with repeats, values between, before and
  /// after them all).
  @Test func aSearchFromAHintAnswersAsAWholeSearch() {
    var generator = SystemRandomNumberGenerator()
    for size in [0, 1, 2, 3, 7, 64, 1_000] {
      let values = (0..<size).map { _ in UInt64.random(in: 0..<3 * UInt64(max(size, 1)), using: &generator) }.sorted()
      for value in [0] + values + values.map { $0 + 1 } + [UInt64.max] {
        let whole = values.firstIndex(notBelow: value) { $0 }
        for hint in Set([0, 1, whole, whole + 1, size / 2, size, max(0, whole - 3)]) where hint <= size {
          #expect(
            values.firstIndex(notBelow: value, by: { $0 }, from: hint) == whole,
            "size \(size) value \(value) hint \(hint)")
        }
      }
    }
  }
}

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

  /// While other threads run (this test process has several) prologues are not moved: a
  /// function without a NOP gets a trap site instead. Two threads call it all along while it
  /// is attached and detached ten times: every call returns what it should, the handlers see
  /// the calls made while attached, and its bytes come back after each detach.
  static let trapEntries = Atomic<Int>(0)
  static let trapExits = Atomic<Int>(0)

  @Test func trapSitesWhileOtherThreadsRun() throws {
    let tracer = Tracer()
    tracer.relocatesPrologues = true
    let function = PatchSiteTests.plainSwiftFunction
    let address = unsafeBitCast(function as @convention(c) (Int) -> Int, to: UInt64.self)
    let before = SiteBytes(reading: address)
    let stop = Atomic<Bool>(false)
    let wrong = Atomic<Int>(0)
    let calls = Atomic<Int>(0)
    let callers = (0..<2).map { _ in
      Thread {
        var n = 0
        while !stop.load(ordering: .relaxed) {
          if function(n) != n &* 3 &+ 1 { wrong.add(1, ordering: .relaxed) }
          n += 1
        }
        calls.add(n, ordering: .relaxed)
      }
    }
    for caller in callers { caller.start() }
    defer { stop.store(true, ordering: .relaxed) }
    let model = FunctionModel(integerArguments: 1, stackArgumentWords: 0, returns: .integer)
    for _ in 0..<10 {
      let entry = try tracer.attach(
        .entry({ _, _ in PatchSiteTests.trapEntries.add(1, ordering: .relaxed) }), to: .address(address))
      let exit = try tracer.attach(
        .exit({ _, _ in PatchSiteTests.trapExits.add(1, ordering: .relaxed) }), to: .address(address), model: model)
      #expect(SiteBytes(reading: address).byte(0) == 0xcc)
      #expect(function(4) == 13)
      usleep(2_000)
      exit.detach()
      entry.detach()
      #expect(SiteBytes(reading: address) == before)
    }
    stop.store(true, ordering: .relaxed)
    while callers.contains(where: { !$0.isFinished }) { usleep(1_000) }
    #expect(wrong.load(ordering: .relaxed) == 0)
    let entries = Self.trapEntries.load(ordering: .relaxed)
    #expect(entries >= 10 && Self.trapExits.load(ordering: .relaxed) >= 10)
    #expect(calls.load(ordering: .relaxed) > entries / 2)
    #expect(tracer.reclaim() >= 0)
  }

  /// A thread that traps on a site being put back goes to its resume address, whatever it is.
  @Test func theTrapHandlerSendsThreadsToTheResumeAddress() {
    let nop = SiteBytes(raw: 0x0044_1f0f)
    let sites = [
      TextPatcher.AcceptedSite(request: 0, address: 0x1000, replacement: nop, kind: CTRACERY_POKE_SKIP, resume: 0x1005),
      TextPatcher.AcceptedSite(request: 1, address: 0x2000, replacement: nop, kind: CTRACERY_POKE_SKIP, resume: 0x9000),
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

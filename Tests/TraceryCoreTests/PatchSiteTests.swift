import CTraceryShims
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

  /// Relocating prologues is refused while other threads run (this test process has several):
  /// the function without a NOP stays refused as before, with the same reason.
  @Test func noRelocationWhileOtherThreadsRun() {
    let tracer = Tracer()
    tracer.relocatesPrologues = true
    let swiftFunction = unsafeBitCast(
      PatchSiteTests.plainSwiftFunction as @convention(c) (Int) -> Int, to: UInt64.self)
    let error = #expect(throws: AttachError.self) {
      try tracer.attach(.entry({ _, _ in }), to: .address(swiftFunction))
    }
    #expect("\(String(describing: error))".contains("not a 5-byte NOP"), "\(String(describing: error))")
    #expect(PatchSiteTests.plainSwiftFunction(2) == 7)
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

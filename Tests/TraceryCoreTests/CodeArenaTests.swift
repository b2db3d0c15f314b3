import Foundation
import Testing
import TraceryX86

@testable import TraceryCore

@Suite struct CodeArenaTests {
  /// Code lands within rel32 reach of the address asked for, runs, and is never in a mapping that
  /// is writable and executable at once.
  @Test func blocksAreReachableRunnableAndNeverWritableExecutable() throws {
    let near = try FixtureSites.sites()[0]
    let arena = CodeArena()
    let block = try arena.allocate(near: near, size: 64)
    #expect(block.isReachable(from: near))
    #expect(block.address % 16 == 0)
    var writer = X86Writer(base: block.address)
    writer.putLea(.rax, Memory(.rdi, 1))  // return x + 1
    writer.putRet()
    block.write(try writer.finish())
    let function = unsafeBitCast(
      UnsafeRawPointer(bitPattern: UInt(block.address))!, to: (@convention(c) (Int) -> Int).self)
    #expect(function(41) == 42)
    let map = MemoryMap.current()
    let region = try #require(map.region(containing: block.address))
    #expect(region.executable && !region.writable)
    #expect(!map.regions.contains { $0.writable && $0.executable })
  }

  @Test func releasedSpaceIsReusedAndFarRequestsGetTheirOwnSlab() throws {
    let near = try FixtureSites.sites()[0]
    let arena = CodeArena()
    let first = try arena.allocate(near: near, size: 100)
    #expect(first.size == 112)
    let second = try arena.allocate(near: near, size: 16)
    #expect(second.address == first.address + 112)
    #expect(arena.bytesInUse == 128)
    arena.release(first)
    let third = try arena.allocate(near: near, size: 48)
    #expect(third.address == first.address)
    arena.release(second)
    arena.release(third)
    #expect(arena.bytesInUse == 0)
    // 64 GiB away from the first slab: out of its reach, so a new slab near the new address.
    let far = near &+ (64 << 30)
    let farBlock = try arena.allocate(near: far, size: 16)
    #expect(farBlock.isReachable(from: far))
    #expect(!farBlock.isReachable(from: near))
  }
}

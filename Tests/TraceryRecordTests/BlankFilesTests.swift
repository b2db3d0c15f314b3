import Glibc
import Testing

@testable import TraceryRecord

/// Blank files kept for traced processes (`BlankFiles`): a file made in the trace directory is a
/// blank taken by rename while there is one, never over an existing name, never one that is not
/// an empty file in a private directory of this user's, and made as before when none is left;
/// the keeper makes taken slots again and removes the blanks and their directory when it stops.
@Suite struct BlankFilesTests {
  /// A new empty directory under /tmp.
  static func directory(_ name: String) -> String {
    var template = Array("/tmp/tracery-\(name)-XXXXXX".utf8CString)
    let made = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
    #expect(made != nil)
    return String(decoding: template.dropLast().map { UInt8(bitPattern: $0) }, as: UTF8.self)
  }

  /// Removes the directory, its files and its directories' files.
  static func remove(_ path: String) {
    for name in Files.list(path) ?? [] {
      if unlink(path + "/" + name) != 0 { remove(path + "/" + name) }
    }
    rmdir(path)
  }

  static func inode(_ path: String) -> UInt64? {
    var status = stat()
    return lstat(path, &status) == 0 ? UInt64(status.st_ino) : nil
  }

  static func blanks(in directory: String, slots: Int) -> [Int] {
    (0..<slots).filter { inode(directory + "/" + BlankFiles.name(slot: $0)) != nil }
  }

  /// Makes `count` blanks in `directory` by hand; their inodes.
  static func makeBlanks(_ count: Int, in directory: String) -> Set<UInt64> {
    Set(
      (0..<count).compactMap { slot -> UInt64? in
        let fd = open(directory + "/" + BlankFiles.name(slot: slot), O_WRONLY | O_CREAT | O_EXCL, 0o600)
        #expect(fd >= 0)
        close(fd)
        return inode(directory + "/" + BlankFiles.name(slot: slot))
      })
  }

  /// A new trace directory (`path`, under `base`) and, with `blanks`, its blank directory.
  static func trace(_ name: String, blanks: Bool = true) -> (base: String, path: String, blanks: String) {
    let base = directory(name)
    let path = base + "/trace"
    #expect(mkdir(path, 0o700) == 0)
    if blanks { #expect(mkdir(BlankFiles.directory(for: path), 0o700) == 0) }
    return (base, path, BlankFiles.directory(for: path))
  }

  @Test func theBlanksAreBesideTheTrace() {
    #expect(BlankFiles.directory(for: "/tmp/x/trace") == "/tmp/x/.trace.blanks")
    #expect(BlankFiles.directory(for: "/tmp/x/trace/") == "/tmp/x/.trace.blanks")
    #expect(BlankFiles.directory(for: "/trace") == "/.trace.blanks")
  }

  @Test func aFileMadeIsABlankTakenWhileThereIsOne() throws {
    let (base, path, blanks) = Self.trace("blanks")
    defer { Self.remove(base) }
    let slots = 3
    let inodes = Self.makeBlanks(slots, in: blanks)
    let directory = try #require(TraceDirectory(path: path, blankSlots: slots))
    let first = try #require(directory.create("first.events", flags: O_RDWR, reopenFlags: O_RDWR))
    #expect(inodes.contains(Self.inode(path + "/first.events") ?? 0))
    #expect(Self.blanks(in: blanks, slots: slots).count == slots - 1)
    // Written through the descriptor it was opened with.
    #expect(first.withDescriptor { write($0, "x", 1) } == 1)
    first.close()

    // An existing name: refused as a creation is, and no blank is taken.
    #expect(directory.create("first.events", flags: O_RDWR, reopenFlags: O_RDWR) == nil)
    #expect(errno == EEXIST)
    #expect(Self.blanks(in: blanks, slots: slots).count == slots - 1)

    for index in 1..<slots {
      _ = try #require(directory.create("next\(index).events", flags: O_RDWR, reopenFlags: O_RDWR))
      #expect(inodes.contains(Self.inode(path + "/next\(index).events") ?? 0))
    }
    #expect(Self.blanks(in: blanks, slots: slots).isEmpty)
    // None left: made as without blanks, with the trace's mode.
    _ = try #require(directory.create("made.events", flags: O_RDWR, reopenFlags: O_RDWR))
    let made = path + "/made.events"
    #expect(!inodes.contains(Self.inode(made) ?? 0))
    var status = stat()
    #expect(lstat(made, &status) == 0 && status.st_mode & 0o777 == TraceFormat.fileMode)
  }

  /// The keeper also keeps events blanks (`BlankFiles.Kind.events`): a thread's event file of
  /// the agent's chunk size takes one, its first chunk already reserved and begun with zeros,
  /// so that mapping it writes and reserves nothing more; an event file of another chunk size
  /// takes an empty blank, as a process file does.
  @Test func anEventFileTakesABlankMadeReadyForItsFirstChunk() throws {
    let (base, path, blanks) = Self.trace("event-blanks", blanks: false)
    defer { Self.remove(base) }
    let keeper = try #require(BlankFileKeeper(trace: path, slots: 2))
    defer { keeper.stop() }
    func ready(_ slot: Int) -> String { blanks + "/" + BlankFiles.name(slot: slot, kind: .events) }
    Self.wait { Self.inode(ready(1)) != nil && Self.blanks(in: blanks, slots: 2).count == 2 }
    let size = TraceFormat.headerSize + EventFile.standardChunkSize
    var status = stat()
    #expect(lstat(ready(0), &status) == 0 && status.st_size == size && Int(status.st_blocks) * 512 >= size)
    let readyInodes = Set([0, 1].compactMap { Self.inode(ready($0)) })
    let emptyInodes = Set([0, 1].compactMap { Self.inode(blanks + "/" + BlankFiles.name(slot: $0)) })
    #expect(readyInodes.count == 2 && emptyInodes.count == 2)

    let directory = try #require(TraceDirectory(path: path, blankSlots: 2))
    let file = try #require(
      EventFile(
        in: directory, name: "7.0-7.events", pid: 7, tid: 7, chunkSize: EventFile.standardChunkSize, limit: 4 << 20))
    #expect(readyInodes.contains(Self.inode(path + "/7.0-7.events") ?? 0))
    let chunk = try #require(file.nextChunk(leaving: 0))
    chunk.storeBytes(of: 0x1234, toByteOffset: 64, as: UInt64.self)
    #expect(lstat(path + "/7.0-7.events", &status) == 0 && status.st_size == size)
    let header = Files.read(path + "/7.0-7.events").map { Array($0.prefix(8)) }
    #expect(header == TraceFormat.magic)
    _ = file.close(cursor: UInt64(UInt(bitPattern: chunk.baseAddress!)) + 72)

    let small = try #require(
      EventFile(in: directory, name: "7.0-8.events", pid: 7, tid: 8, chunkSize: 64 << 10, limit: 4 << 20))
    #expect(emptyInodes.contains(Self.inode(path + "/7.0-8.events") ?? 0))
    _ = small.close(cursor: 0)
  }

  @Test func aBlankThatIsNotOneIsNeverTaken() throws {
    let (base, path, blanks) = Self.trace("not-blanks")
    defer { Self.remove(base) }
    // A "blank" with content (or a link to some other file): the file is made new.
    let fd = open(blanks + "/" + BlankFiles.name(slot: 0), O_WRONLY | O_CREAT | O_EXCL, 0o600)
    #expect(write(fd, "secret", 6) == 6)
    close(fd)
    let directory = try #require(TraceDirectory(path: path, blankSlots: 1))
    _ = try #require(directory.create("a.events", flags: O_RDWR, reopenFlags: O_RDWR))
    var status = stat()
    #expect(lstat(path + "/a.events", &status) == 0 && status.st_size == 0)
    // Blanks in a directory others may write: not taken.
    let inodes = Self.makeBlanks(1, in: blanks)
    #expect(chmod(blanks, 0o777) == 0)
    _ = try #require(directory.create("b.events", flags: O_RDWR, reopenFlags: O_RDWR))
    #expect(!inodes.contains(Self.inode(path + "/b.events") ?? 0))
    #expect(Self.blanks(in: blanks, slots: 1) == [0])
  }

  /// Waits (up to 5 s) until `done`.
  static func wait(until done: () -> Bool) {
    var waited = 0
    while !done() && waited < 5000 {
      usleep(1000)
      waited += 1
    }
  }

  @Test func theKeeperMakesTakenSlotsAgainAndRemovesThemWhenItStops() throws {
    // The blank directory left by a killed recorder: emptied and used again.
    let (base, path, blanks) = Self.trace("keeper")
    defer { Self.remove(base) }
    for slot in 0..<2 {
      let fd = open(blanks + "/" + BlankFiles.name(slot: slot), O_WRONLY | O_CREAT | O_EXCL, 0o600)
      #expect(write(fd, "stale", 5) == 5)
      close(fd)
    }
    let keeper = try #require(BlankFileKeeper(trace: path, slots: 4))
    // Made by the keeper's thread, as it starts.
    Self.wait { Self.blanks(in: blanks, slots: 4).count == 4 }
    #expect(Self.blanks(in: blanks, slots: 4) == [0, 1, 2, 3])
    var status = stat()
    #expect((0..<4).allSatisfy { lstat(blanks + "/" + BlankFiles.name(slot: $0), &status) == 0 && status.st_size == 0 })
    #expect(lstat(blanks, &status) == 0 && status.st_mode & 0o777 == 0o700)
    #expect(lstat(blanks + "/blank-02", &status) == 0 && status.st_mode & 0o777 == TraceFormat.fileMode)
    let directory = try #require(TraceDirectory(path: path, blankSlots: 4))
    for index in 0..<10 {
      _ = try #require(directory.create("process-\(index).info", flags: O_WRONLY, reopenFlags: O_WRONLY))
    }
    // Each taken slot is made again (the keeper looks every few milliseconds while slots go).
    Self.wait { Self.blanks(in: blanks, slots: 4).count == 4 }
    #expect(Self.blanks(in: blanks, slots: 4).count == 4)
    keeper.stop()
    #expect(keeper.made >= 1)
    #expect(Self.inode(blanks) == nil)
    // The processes' files stay, and nothing else is in the trace.
    #expect(Set(Files.list(path) ?? []) == Set((0..<10).map { "process-\($0).info" }))
  }
}

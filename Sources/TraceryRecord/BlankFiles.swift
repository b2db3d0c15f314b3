import CTraceryShims

#if canImport(Glibc)
  import Glibc
#endif

/// Empty files made ahead by the long-lived `tracery record` process, for the traced processes
/// to take instead of creating their own.
///
/// Why: every traced process creates two files before its `main` runs (its process file and its
/// main thread's event file), and a file creation on this machine's ext4 costs 0.1-0.3 ms (the
/// more files were deleted in the last seconds, the more: its inode allocator steps over recently
/// freed inodes), up to ~0.6 ms of each child's start. Taking a blank is one rename (~30 µs in a
/// fresh process); the keeper makes the next one on its own thread, off the child's path.
/// (uftrace's children create no files at all: they hand their buffers to its recorder.)
///
/// Where: in a directory beside the trace directory, `.NAME.blanks` for a trace `NAME` (same
/// filesystem, so a rename moves a blank into the trace). Not inside the trace: a program that
/// deletes its own trace directory (`rm -rf`) would race with the keeper making blanks there,
/// and fail to remove it.
///
/// Protocol: the keeper (one thread of `tracery record`) makes the blank directory (this user's,
/// private) and in it `blank-00` … (`slots` of them, empty, `TraceFormat.fileMode`) and as many
/// `events-00` … (`Kind.events`: a thread's event file ready for its first chunk), and makes again
/// the slots it finds gone. A traced process claims one (`TraceDirectory.create`): it
/// opens the blank directory and checks it is its user's and writable by no other (as it checked
/// the trace directory: a blank planted by another user could be a link to any file), renames a
/// blank into the trace directory under the name it needs with RENAME_NOREPLACE, opens that name,
/// and checks it got a regular file with one link and its kind's size (`Kind.size`). The rename
/// is atomic (of two processes racing for one slot, the second finds it gone and tries the next),
/// and the name is the process's own (its pid is in it), so what it opens is the file it took. A slot missing, the
/// pool emptied by a burst, the keeper gone, another filesystem: the process creates its file as
/// it would without a keeper. `stop` removes the blanks and their directory (a keeper killed
/// before `stop` leaves them; the next `tracery record` of the same trace removes them).
public enum BlankFiles {
  /// The slots `tracery record` keeps: a process takes one per thread it starts (and its process
  /// file), and the keeper makes them again within about a millisecond while processes take them,
  /// so a few processes starting at once find theirs. Each costs the recorder a file creation (on
  /// its own thread) and a removal at its end.
  public static let defaultSlots = 8

  /// How many slots a process tries before it creates its file itself.
  static let attempts = 8

  /// The blank directory for the trace directory `trace` (an absolute path).
  /// (On bytes: `split` and `joined` cost a traced process ~0.1 ms of the Swift runtime's
  /// first-use work, looking up their generic types' metadata by mangled name.)
  public static func directory(for trace: String) -> String {
    var path = Array(trace.utf8)
    while path.count > 1, path.last == UInt8(ascii: "/") { path.removeLast() }
    let slash = path.lastIndex(of: UInt8(ascii: "/"))
    let parent = slash.map { String(decoding: path[..<$0], as: UTF8.self) } ?? ""
    let name = String(decoding: path[(slash.map { $0 + 1 } ?? 0)...], as: UTF8.self)
    return parent + "/." + name + ".blanks"
  }

  /// What a blank is for.
  public enum Kind: Sendable {
    /// An empty file: a process file, or a thread's event file of another chunk size.
    case empty
    /// A thread's event file made ready for its first chunk (`EventFile.standardChunkSize`):
    /// the header and that chunk reserved, the header and the chunk's first
    /// `EventFile.firstPages` written as zeros (`EventFile.prepareBlank`). Writing those zeros
    /// and reserving the rest cost each thread's first event ~0.2 ms (this machine, slow level).
    case events

    var prefix: String { self == .empty ? "blank-" : "events-" }
    /// The size a blank of this kind has when it is one.
    var size: Int { self == .empty ? 0 : TraceFormat.headerSize + EventFile.standardChunkSize }
  }

  static func name(slot: Int, kind: Kind = .empty) -> String {
    kind.prefix + (slot < 10 ? "0\(slot)" : "\(slot)")
  }

  /// Slots tried by this process: consecutive from a start that differs between processes and
  /// between one process's claims, so that concurrent processes mostly try different slots.
  nonisolated(unsafe) private static var claims: UInt32 = 0

  /// Renames a blank of `slots` in `blanks` (a path) to `name` in `directory` (a descriptor) and
  /// opens it with `flags`. nil with errno EEXIST when `name` exists (no blank is taken then); nil
  /// with another errno when no blank could be taken (the caller creates the file itself).
  static func claim(
    from blanks: String, slots: Int, into directory: Int32, as name: String, flags: Int32, kind: Kind = .empty
  ) -> Int32? {
    errno = ENOENT
    guard slots > 0 else { return nil }
    let source = open(blanks, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
    guard source >= 0 else { return nil }
    defer { close(source) }
    var status = stat()
    guard fstat(source, &status) == 0, status.st_uid == geteuid(), status.st_mode & 0o022 == 0 else {
      errno = EPERM
      return nil
    }
    // (Events blanks start in the slots the keeper fills first — it keeps a few and adds more as
    // they are taken — rather than tripping over missing ones: a failed rename is ~4 µs.)
    let spread = kind == .events ? min(slots, BlankFileKeeper.firstEventSlots) : slots
    let start = Int(UInt32(truncatingIfNeeded: getpid()) &* 2_654_435_761 &+ claims) % spread
    claims &+= 1
    for attempt in 0..<min(attempts, slots) {
      let blank = Self.name(slot: (start + attempt) % slots, kind: kind)
      guard ctracery_rename_noreplace(source, blank, directory, name) == 0 else {
        if errno == ENOENT { continue }
        return nil  // EEXIST: `name` is taken; EXDEV, EINVAL: not on this filesystem.
      }
      let fd = openat(directory, name, flags | O_NOFOLLOW | O_CLOEXEC)
      guard fd >= 0, fstat(fd, &status) == 0, status.st_mode & S_IFMT == S_IFREG, status.st_nlink == 1,
        status.st_size == kind.size
      else {
        // Not a blank (or not ours to open): not kept under a name of the trace's.
        if fd >= 0 { close(fd) }
        unlinkat(directory, name, 0)
        errno = EPERM
        return nil
      }
      return fd
    }
    errno = ENOENT
    return nil
  }
}

/// Keeps the blank files of a trace (`BlankFiles`) while the program runs: one thread that looks
/// for taken slots every millisecond while processes take them, less often (up to every 32 ms)
/// while none does, and makes each taken slot again. A look costs one `faccessat` per slot,
/// ~1 µs each.
///
/// A blank is made unnamed (O_TMPFILE) and then linked under its slot's name: a creation holds
/// its directory's lock while the file system finds a free inode (on this machine's ext4, with
/// no journal, it steps over every inode freed in the last seconds: a millisecond and more after
/// a trace was deleted), and a process claiming a blank (a rename out of that directory) waited
/// for that lock, spinning. A link holds it for microseconds.
///
/// (Not inotify, which would wake the keeper at each rename: closing its descriptor waits for the
/// kernel to release its marks, an SRCU grace period, 5-16 ms here, added to every `tracery
/// record`. Nor a message from each process: sending one cost it as much as the rename.)
///
/// Protocol: `init` makes the directory and starts the thread, which makes every slot (while the
/// program starts: not on the recorder's path) and then looks; `stop` (once, from the thread that
/// made the keeper) wakes it through a pipe, waits for it, and removes the blanks and their
/// directory.
public final class BlankFileKeeper: @unchecked Sendable {
  // @unchecked: `made` belongs to the keeper's thread until `stop` joined it.
  public let slots: Int
  private let path: String
  private let directory: Int32
  /// A pipe: `stop` writes to it to wake the thread.
  private var wake: [Int32] = [-1, -1]
  private var thread = pthread_t()
  private var stopped = false
  /// Blanks made again after a process took one.
  public private(set) var made = 0
  /// Events blanks kept (`BlankFiles.Kind.events`): few at first, twice as many after a look
  /// finds them all taken, up to `slots`. Each costs its making and its removal at the end
  /// (~0.1 ms: its written pages and reserved blocks freed), which a program of one process would
  /// pay for all `slots` (+0.9 ms a `tracery record` of a short program with 8).
  private var eventSlots: Int
  static let firstEventSlots = 2

  /// Milliseconds between looks: the shortest while slots are being taken, doubling to the
  /// longest while none is.
  static let shortestInterval: Int32 = 1
  static let longestInterval: Int32 = 32

  /// Keeps blanks for the trace directory `trace` (an absolute path). nil when their directory
  /// cannot be made, or is there and not this user's (the processes then create their files).
  public init?(trace: String, slots: Int = BlankFiles.defaultSlots) {
    self.slots = min(slots, 100)
    eventSlots = min(self.slots, Self.firstEventSlots)
    path = BlankFiles.directory(for: trace)
    // Left by a recorder that was killed: this user's own, emptied and used again.
    if mkdir(path, 0o700) != 0 && errno == EEXIST { Self.empty(path) }
    directory = open(path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
    var status = stat()
    guard directory >= 0, fstat(directory, &status) == 0, status.st_uid == geteuid(), pipe(&wake) == 0,
      fcntl(wake[0], F_SETFD, FD_CLOEXEC) == 0, fcntl(wake[1], F_SETFD, FD_CLOEXEC) == 0
    else {
      closeDescriptors()
      return nil
    }
    fchmod(directory, 0o700)
    let started = pthread_create(
      &thread, nil,
      { context in
        Unmanaged<BlankFileKeeper>.fromOpaque(context!).takeUnretainedValue().serve()
        return nil
      }, Unmanaged.passUnretained(self).toOpaque())
    guard started == 0 else {
      closeDescriptors()
      rmdir(path)
      return nil
    }
  }

  deinit { stop() }

  /// Stops making blanks and removes them and their directory.
  public func stop() {
    guard !stopped else { return }
    stopped = true
    var one: UInt8 = 1
    _ = write(wake[1], &one, 1)
    pthread_join(thread, nil)
    closeDescriptors()
    Self.empty(path)
    rmdir(path)
  }

  /// Removes the blanks in `path` if it is a directory of this user's.
  private static func empty(_ path: String) {
    var status = stat()
    guard lstat(path, &status) == 0, status.st_mode & S_IFMT == S_IFDIR, status.st_uid == geteuid() else { return }
    for name in Files.list(path) ?? []
    where name.hasPrefix(BlankFiles.Kind.empty.prefix) || name.hasPrefix(BlankFiles.Kind.events.prefix) {
      unlink(path + "/" + name)
    }
  }

  /// Makes `slot` of `kind` unless it is there; whether it was made. (A slot taken between the
  /// look and the link stays taken: the link fails, the unnamed file goes, the next look makes
  /// it.)
  private func make(_ slot: Int, _ kind: BlankFiles.Kind) -> Bool {
    let name = BlankFiles.name(slot: slot, kind: kind)
    guard faccessat(directory, name, F_OK, AT_SYMLINK_NOFOLLOW) != 0, errno == ENOENT else { return false }
    // (The mode is narrowed by the umask, as a named creation's is.)
    let fd = openat(directory, ".", ctracery_O_TMPFILE | O_RDWR | O_CLOEXEC, TraceFormat.fileMode)
    if fd >= 0 {
      defer { close(fd) }
      guard kind == .empty || EventFile.prepareBlank(fd) else { return false }
      if linkat(AT_FDCWD, "/proc/self/fd/\(fd)", directory, name, AT_SYMLINK_FOLLOW) == 0 { return true }
      if errno == EEXIST { return false }
    }
    // A file system without unnamed files, or no /proc: made by name (holding the lock); no
    // events blanks there (one would be seen by name before it is ready).
    guard kind == .empty else { return false }
    let named = openat(directory, name, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, TraceFormat.fileMode)
    if named >= 0 { close(named) }
    return named >= 0
  }

  /// Whether `stop` asked the thread to end (a look at the pipe that does not wait).
  private func stopAsked() -> Bool {
    var woken = pollfd(fd: wake[0], events: Int16(POLLIN), revents: 0)
    return poll(&woken, 1, 0) != 0
  }

  private func serve() {
    // The first ones one by one, until `stop` asks: a short program's `tracery record` ended
    // waiting for all of them (a creation takes up to a millisecond on this machine's ext4).
    for slot in 0..<slots {
      guard !stopAsked() else { return }
      _ = make(slot, .empty)
    }
    for slot in 0..<eventSlots {
      guard !stopAsked() else { return }
      _ = make(slot, .events)
    }
    var woken = pollfd(fd: wake[0], events: Int16(POLLIN), revents: 0)
    var interval = Self.shortestInterval
    while true {
      let ready = poll(&woken, 1, interval)
      if ready > 0 { return }
      guard ready == 0 || errno == EINTR else { return }
      var remade = 0
      for slot in 0..<slots where make(slot, .empty) { remade += 1 }
      var events = 0
      for slot in 0..<eventSlots where make(slot, .events) { events += 1 }
      if events == eventSlots && eventSlots < slots {
        // All taken since the last look: more next time (new slots, not counted as made again).
        let kept = eventSlots
        eventSlots = min(slots, eventSlots * 2)
        for slot in kept..<eventSlots { _ = make(slot, .events) }
      }
      remade += events
      made += remade
      interval = remade > 0 ? Self.shortestInterval : min(interval * 2, Self.longestInterval)
    }
  }

  private func closeDescriptors() {
    for fd in [directory] + wake where fd >= 0 { close(fd) }
  }
}

#if canImport(Glibc)
  import Glibc
#endif

/// A descriptor Tracery keeps open inside a traced program, checked before each use.
///
/// The descriptor is the program's as much as ours: a program may close every descriptor it did
/// not open (`closefrom`, a loop up to the limit: daemons, OpenSSH) and open its own files, which
/// then get our number. Every use first checks that the descriptor still is this file (device
/// and inode), else opens the file again (`reopen`); a number that has become the program's is
/// never written or closed. Kept, a descriptor goes on working after the program changes its
/// root directory or drops its privileges (permissions are checked when a file is opened), where
/// opening the file again by its path would fail.
///
/// Protocol: `withDescriptor` and `close` hold `lock` while they use the descriptor; `isOurs`
/// may be called by `withDescriptor`'s body (a long write checks again as it goes).
public final class CheckedFile: @unchecked Sendable {
  // @unchecked: `fd` under `lock`.
  private var fd: Int32
  private let device: UInt64
  private let inode: UInt64
  private let reopen: () -> Int32
  private let lock: UnsafeMutablePointer<pthread_mutex_t> = {
    let lock = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    pthread_mutex_init(lock, nil)
    return lock
  }()

  /// Keeps `fd` (this file: its device and inode are taken now); `reopen` opens the same file
  /// again (a descriptor, or -1). nil when `fd` cannot be examined (it is closed then).
  public init?(_ fd: Int32, reopen: @escaping () -> Int32) {
    var status = stat()
    guard fstat(fd, &status) == 0 else {
      Glibc.close(fd)
      return nil
    }
    self.fd = fd
    device = UInt64(status.st_dev)
    inode = UInt64(status.st_ino)
    self.reopen = reopen
  }

  deinit {
    pthread_mutex_destroy(lock)
    lock.deallocate()
  }

  /// Runs `body` with a descriptor of this file (the kept one if it still is this file, else one
  /// opened again and kept), under the lock. nil when the file cannot be opened again (the
  /// program changed its user or root, or the file was replaced).
  public func withDescriptor<T>(_ body: (Int32) -> T?) -> T? {
    pthread_mutex_lock(lock)
    defer { pthread_mutex_unlock(lock) }
    if fd < 0 || !isOurs(fd) {
      // Not ours any more (closed by the program, perhaps its own file's number now): forgotten,
      // never closed.
      fd = -1
      let opened = reopen()
      guard opened >= 0 else { return nil }
      guard isOurs(opened) else {
        Glibc.close(opened)
        return nil
      }
      fd = opened
    }
    return body(fd)
  }

  /// Whether `fd` is this file.
  public func isOurs(_ fd: Int32) -> Bool {
    var status = stat()
    return fstat(fd, &status) == 0 && UInt64(status.st_dev) == device && UInt64(status.st_ino) == inode
  }

  /// In the child of a `fork`, before any other use there: the lock as if never taken. Another
  /// thread of the parent may have held it at the fork (appending to the process file, making
  /// its event file), and no thread of the child would ever release it (the forkthreads
  /// reliability test's child hung in `close` so). Only the child's one thread runs then.
  public func forkedChild() { pthread_mutex_init(lock, nil) }

  /// Closes the kept descriptor if it still is this file.
  public func close() {
    pthread_mutex_lock(lock)
    if fd >= 0, isOurs(fd) { Glibc.close(fd) }
    fd = -1
    pthread_mutex_unlock(lock)
  }
}

/// The trace directory as a traced program's agent reaches it: by a kept descriptor
/// (a `CheckedFile`), so that files are made and opened again in it after the program
/// changed its root directory (daemons chroot) or its working directory.
public final class TraceDirectory: @unchecked Sendable {
  // @unchecked: immutable but for `directory`, which guards itself.
  public let path: String
  private let directory: CheckedFile

  /// How many blank files (`BlankFiles`) a keeper keeps for the directory; 0: none.
  public let blankSlots: Int
  /// Where they are.
  private let blanks: String

  /// nil when `path` cannot be opened as a directory. `blankSlots`: what TRACERY_BLANKS says.
  public init?(path: String, blankSlots: Int = 0) {
    self.blankSlots = blankSlots
    blanks = blankSlots > 0 ? BlankFiles.directory(for: path) : ""
    let flags = O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC
    let opened = Glibc.open(path, flags)
    guard opened >= 0, let directory = CheckedFile(opened, reopen: { Glibc.open(path, flags) }) else { return nil }
    self.path = path
    self.directory = directory
  }

  /// In the child of a `fork`: `CheckedFile.forkedChild`.
  public func forkedChild() { directory.forkedChild() }

  /// `openat` of `name` in the directory; -1 when it cannot be reached or opened.
  public func open(_ name: String, _ flags: Int32, _ mode: mode_t = 0) -> Int32 {
    directory.withDescriptor { openat($0, name, flags, mode) } ?? -1
  }

  /// Creates `name` (a new file, never through a symbolic link, `TraceFormat.fileMode`) and
  /// keeps it open with `flags`, opened again with `reopenFlags` (a `CheckedFile`).
  /// A blank file of `kind` is taken when there is one (`BlankFiles`); nil with errno EEXIST
  /// when `name` exists.
  public func create(
    _ name: String, flags: Int32, reopenFlags: Int32, kind: BlankFiles.Kind = .empty
  ) -> CheckedFile? {
    var claimed: Int32?
    if blankSlots > 0 {
      claimed = directory.withDescriptor {
        BlankFiles.claim(from: blanks, slots: blankSlots, into: $0, as: name, flags: flags, kind: kind)
      }
      if claimed == nil && errno == EEXIST { return nil }
    }
    let created =
      claimed ?? open(name, flags | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, TraceFormat.fileMode)
    guard created >= 0 else { return nil }
    return CheckedFile(created) { [self] in self.open(name, reopenFlags | O_NOFOLLOW | O_CLOEXEC) }
  }

  /// Closes the kept descriptor (after a detach).
  public func close() { directory.close() }
}

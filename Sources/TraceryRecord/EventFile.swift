#if canImport(Glibc)
  import Glibc
#endif

/// One thread's event file, written through shared mappings: the header page stays mapped, and
/// events go into one mapped chunk at a time. The page cache holds everything written, so a
/// crash or `kill -9` of the traced program loses nothing already stored.
///
/// Protocol: only the owning thread calls `nextChunk`, `countDropped` and `close` (the agent
/// calls them from the recorder's refill, with the recursion guard held).
public final class EventFile {
  private let fd: Int32
  private let header: UnsafeMutableRawPointer
  public let chunkSize: Int
  private let limit: Int
  private var chunks = 0
  private var chunk: UnsafeMutableRawPointer?

  /// Creates the file and its header. nil when it cannot be created or mapped.
  public init?(path: String, pid: Int32, tid: Int32, chunkSize: Int, limit: Int) {
    fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
    guard fd >= 0 else { return nil }
    guard ftruncate(fd, off_t(TraceFormat.headerSize)) == 0,
      let mapped = mmap(nil, TraceFormat.headerSize, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0), mapped != MAP_FAILED
    else {
      Glibc.close(fd)
      return nil
    }
    header = mapped
    self.chunkSize = chunkSize
    self.limit = limit
    for (index, byte) in TraceFormat.magic.enumerated() {
      header.storeBytes(of: byte, toByteOffset: index, as: UInt8.self)
    }
    header.storeBytes(of: TraceFormat.version, toByteOffset: TraceFormat.Header.version, as: UInt32.self)
    header.storeBytes(of: UInt32(bitPattern: pid), toByteOffset: TraceFormat.Header.pid, as: UInt32.self)
    header.storeBytes(of: UInt32(bitPattern: tid), toByteOffset: TraceFormat.Header.tid, as: UInt32.self)
    header.storeBytes(of: UInt64(chunkSize), toByteOffset: TraceFormat.Header.chunkSize, as: UInt64.self)
  }

  /// Maps the next chunk (growing the file) and returns it; nil when the limit is reached or
  /// the file cannot grow (disk full): the caller then counts drops.
  public func nextChunk() -> UnsafeMutableRawBufferPointer? {
    let offset = TraceFormat.headerSize + chunks * chunkSize
    guard offset + chunkSize <= limit + TraceFormat.headerSize else { return nil }
    // fallocate reserves the blocks now, so a full disk is seen here, not as SIGBUS later.
    guard posix_fallocate(fd, off_t(offset), off_t(chunkSize)) == 0,
      let mapped = mmap(nil, chunkSize, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, off_t(offset)),
      mapped != MAP_FAILED
    else { return nil }
    if let chunk { munmap(chunk, chunkSize) }
    chunk = mapped
    chunks += 1
    return UnsafeMutableRawBufferPointer(start: mapped, count: chunkSize)
  }

  /// One more event that found no room (kept in the header: every reader shows it).
  public func countDropped() {
    let dropped = header.load(fromByteOffset: TraceFormat.Header.dropped, as: UInt64.self)
    header.storeBytes(of: dropped + 1, toByteOffset: TraceFormat.Header.dropped, as: UInt64.self)
  }

  public func close() {
    if let chunk { munmap(chunk, chunkSize) }
    chunk = nil
    munmap(header, TraceFormat.headerSize)
    Glibc.close(fd)
  }
}

"""Guide: "Database Backend Example" (verbatim)."""
# Verbatim guide code: keep its style (no sorting/formatting fixes).
# ruff: noqa: I001, F401, B905
# fmt: off

from polystore import StorageBackend
import sqlite3
import pickle
from pathlib import Path

class SQLiteBackend(StorageBackend):
    """Backend using SQLite for storage."""

    _backend_type = 'sqlite'

    def __init__(self, db_path="polystore.db"):
        self.db_path = db_path
        self._init_db()

    def _init_db(self):
        """Initialize database schema."""
        conn = sqlite3.connect(self.db_path)
        conn.execute('''
            CREATE TABLE IF NOT EXISTS files (
                path TEXT PRIMARY KEY,
                data BLOB NOT NULL,
                created TIMESTAMP DEFAULT CURRENT_TIMESTAMP
            )
        ''')
        conn.commit()
        conn.close()

    def save(self, data, file_path, **kwargs):
        """Save data to database."""
        conn = sqlite3.connect(self.db_path)
        serialized = pickle.dumps(data)

        conn.execute(
            'INSERT OR REPLACE INTO files (path, data) VALUES (?, ?)',
            (str(file_path), serialized)
        )
        conn.commit()
        conn.close()

    def load(self, file_path, **kwargs):
        """Load data from database."""
        conn = sqlite3.connect(self.db_path)
        cursor = conn.execute(
            'SELECT data FROM files WHERE path = ?',
            (str(file_path),)
        )
        row = cursor.fetchone()
        conn.close()

        if not row:
            raise FileNotFoundError(f"File not found: {file_path}")

        return pickle.loads(row[0])

    def save_batch(self, data_list, output_paths, **kwargs):
        """Batch save."""
        conn = sqlite3.connect(self.db_path)
        for data, path in zip(data_list, output_paths):
            serialized = pickle.dumps(data)
            conn.execute(
                'INSERT OR REPLACE INTO files (path, data) VALUES (?, ?)',
                (str(path), serialized)
            )
        conn.commit()
        conn.close()

    def load_batch(self, file_paths, **kwargs):
        """Batch load."""
        conn = sqlite3.connect(self.db_path)
        results = []
        for path in file_paths:
            cursor = conn.execute(
                'SELECT data FROM files WHERE path = ?',
                (str(path),)
            )
            row = cursor.fetchone()
            if not row:
                raise FileNotFoundError(f"File not found: {path}")
            results.append(pickle.loads(row[0]))
        conn.close()
        return results

    def list_files(self, directory, **kwargs):
        """List files in directory."""
        conn = sqlite3.connect(self.db_path)
        pattern = f"{directory}/%"
        cursor = conn.execute(
            'SELECT path FROM files WHERE path LIKE ?',
            (pattern,)
        )
        files = [row[0] for row in cursor.fetchall()]
        conn.close()
        return files

    def exists(self, path):
        """Check if path exists."""
        conn = sqlite3.connect(self.db_path)
        cursor = conn.execute(
            'SELECT 1 FROM files WHERE path = ?',
            (str(path),)
        )
        exists = cursor.fetchone() is not None
        conn.close()
        return exists

    def is_file(self, path):
        """Check if path is a file."""
        return self.exists(path)

    def is_dir(self, path):
        """Directories don't exist in flat database."""
        return False

    def list_dir(self, path):
        """List directory entries."""
        return self.list_files(path)
